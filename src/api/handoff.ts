/**
 * handoff: move a running instance to another cloudlet that holds its base. The source is
 * paused and its state taken (memory stream + a consistent copy of its disk), made into an
 * overlay against the instance's *base* (not the overlay it came from: what the guest did since
 * is in the state, and the target needs nothing but the base), streamed to the target's
 * synthesize endpoint, and resumed there; the original is stopped only once the target has
 * answered. Should anything fail before that, the source is continued and nothing is lost.
 * Downtime: from pausing the source to the target's first answer.
 */
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { tmpDir } from '../base/paths.js';
import { QmpClient } from '../vm/qmp.js';
import { onCleanup } from '../util/cleanup.js';
import { UsageError } from '../util/errors.js';
import { silent, type Progress } from '../util/progress.js';
import { createOverlay } from './create.js';
import { findInstance, stopInstance } from './instance.js';
import { CloudletClient, type ClientOptions, type RemoteSynthesizeResult } from './remote.js';
import { snapshotVm } from './snapshot.js';

export interface HandoffOptions extends ClientOptions {
  root: string;
  instance: string;
  /** The target cloudlet's URL. */
  to: string;
  /** Ready on the target = this path answers HTTP on the first forward (else its TCP port). */
  waitPath?: string;
  /** Keep the source's directory after stopping it. */
  keep?: boolean;
  progress?: Progress;
}

export interface HandoffResult {
  message_type: 'handoff';
  from: string;
  to: string;
  /** The instance on the target. */
  instance: string;
  base_id: string;
  /** Pausing the source → the target's first answer. */
  downtime_ms: number;
  overlay_bytes: number;
  memory_stream_bytes: number;
  target: RemoteSynthesizeResult;
  timings_ms: { snapshot: number; create: number; transfer_and_synthesize: number; stop_source: number };
}

export async function handoff(o: HandoffOptions): Promise<HandoffResult> {
  const progress = o.progress ?? silent;
  const inst = await findInstance(o.root, o.instance);
  const client = new CloudletClient(o.to, o);
  // The target must be there and hold the base before the source is paused.
  const info = await client.info();
  if (!info.bases.some((b) => b.id === inst.base_id)) {
    throw new UsageError(`${o.to} does not hold base ${inst.base_id.slice(0, 12)}: nothing to hand off to`, {
      base_id: inst.base_id,
    });
  }
  const guestPorts = inst.forwards.map((f) => f.guestPort);
  if (guestPorts.length === 0) throw new UsageError(`instance ${inst.id} has no port forwards to move`);
  await mkdir(tmpDir(o.root), { recursive: true });
  const work = join(tmpDir(o.root), `handoff-${randomBytes(6).toString('hex')}`);
  const unregister = onCleanup(() => rm(work, { recursive: true, force: true }));
  let paused = false;
  try {
    const t0 = performance.now();
    paused = true;
    const snap = await snapshotVm({
      root: o.root,
      instance: inst.id,
      outDir: join(work, 'state'),
      afterCapture: 'stop',
      progress,
    });
    const t1 = performance.now();
    const overlay = join(work, 'handoff.overlay');
    const created = await createOverlay({
      base: { base: inst.base_id, library: o.root },
      disk: snap.disk,
      memory: join(snap.dir, 'memory.stream'),
      output: overlay,
      level: 3,
      progress,
    });
    const t2 = performance.now();
    const target = await client.synthesize({
      base: inst.base_id,
      overlay,
      guestPorts,
      waitPath: o.waitPath,
      name: `handoff-${inst.id}`,
      progress,
    });
    const t3 = performance.now();
    paused = false;
    await stopInstance(o.root, inst.id, o.keep);
    const t4 = performance.now();
    return {
      message_type: 'handoff',
      from: inst.id,
      to: o.to,
      instance: target.instance,
      base_id: inst.base_id,
      downtime_ms: Math.round(t3 - t0),
      overlay_bytes: created.size,
      memory_stream_bytes: snap.memory_bytes,
      target,
      timings_ms: {
        snapshot: Math.round(t1 - t0),
        create: Math.round(t2 - t1),
        transfer_and_synthesize: Math.round(t3 - t2),
        stop_source: Math.round(t4 - t3),
      },
    };
  } catch (err) {
    if (paused) await resume(inst.qmp_socket);
    throw err;
  } finally {
    await rm(work, { recursive: true, force: true });
    unregister();
  }
}

/** The handoff failed: the source runs on as if nothing happened. */
async function resume(qmpSocket: string): Promise<void> {
  try {
    const qmp = await QmpClient.connect(qmpSocket, { timeoutMs: 3000 });
    await qmp.execute('cont').catch(() => undefined);
    await qmp.close();
  } catch {
    // gone: nothing to resume
  }
}
