/**
 * launch: resume a library base as an instance with a fresh disk layer (a qcow2 over the base
 * disk) — the starting point of a customization (Elijah's `cloudlet overlay` flow, headless):
 * install the application through port forwards or the serial console, then `snapshot` and
 * `create`. The memory stream is the base itself as a sparse stream (no pc.ram page differs).
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { openLibraryBase } from '../base/open.js';
import { resolveBaseId } from '../base/library.js';
import { claimInstanceDir, instanceDir } from '../instance/state.js';
import * as qemuImg from '../image/disk/qemu-img.js';
import { MigrationStreamWriter } from '../image/memory/writer.js';
import { CHUNK_SIZE } from '../delta/chunk.js';
import type { PortForward } from '../spec/vm-spec.js';
import type { AccelChoice } from '../vm/accel.js';
import { UsageError } from '../util/errors.js';
import { thawAfterResume, type ThawOutcome } from '../vm/guest-prep.js';
import { onCleanup } from '../util/cleanup.js';
import { newInstanceId, startInstance } from './instance.js';
import { sweepLibrary } from './gc.js';
import { baseBlob } from '../targets/base-vm.js';
import { BLOB_PREFIX, BLOB_START, BLOB_TAIL } from '../targets/blobs.js';

export interface LaunchOptions {
  root: string;
  base: string;
  forwards: PortForward[];
  accel?: AccelChoice;
  /** Raw QEMU options from the operator (--qemu-arg). */
  qemuArgs?: string[];
  /**
   * Pass the guest's discards (fstrim) to the disk layer, and write zeroes as discards: freed
   * blocks then become zero clusters, which cost an overlay nothing. Host-side only (the guest
   * sees the same virtio-blk device either way). Default true.
   */
  discard?: boolean;
}

export interface LaunchResult {
  message_type: 'launch';
  instance: string;
  base_id: string;
  pid: number;
  accel: string;
  dir: string;
  qmp_socket: string;
  serial_socket: string;
  agent_socket?: string;
  forwards: PortForward[];
  /** Agent guests: whether the resumed base had to be thawed (a base captured frozen). */
  guest_thaw?: ThawOutcome;
}

export async function launchBase(opts: LaunchOptions): Promise<LaunchResult> {
  await sweepLibrary(opts.root);
  const id = await resolveBaseId(opts.root, opts.base);
  const base = await openLibraryBase(opts.root, id);
  const iid = newInstanceId();
  const dir = instanceDir(opts.root, iid);
  const unregister = onCleanup(() => rm(dir, { recursive: true, force: true }));
  try {
    if (!base.ramFile || !base.mainBlock || base.ramSectionId === undefined) {
      throw new UsageError(`base ${id.slice(0, 12)} has no memory snapshot: nothing to resume`);
    }
    await claimInstanceDir(dir);
    if (base.diskPath && base.diskFormat) {
      await qemuImg.create(join(dir, 'disk.qcow2'), {
        format: 'qcow2',
        backingFile: base.diskPath,
        backingFormat: base.diskFormat,
      });
    }
    const blob = (name: string): Buffer => baseBlob(base, name);
    const stream = new MigrationStreamWriter(join(dir, 'memory.sparse'));
    await stream.begin(blob(BLOB_PREFIX), blob(BLOB_START), base.ramSectionId);
    // QEMU does not refill ROM blocks on incoming: every page of the small blocks goes in.
    const page = Buffer.alloc(CHUNK_SIZE);
    for (const t of base.targets) {
      if (t.kind !== 'ram' || t.name === base.mainBlock) continue;
      for (let p = 0; p * CHUNK_SIZE < t.size; p++) {
        await t.source.read(p * CHUNK_SIZE, CHUNK_SIZE, page);
        await stream.writePage(t.name, p, page);
      }
    }
    await stream.finish(blob(BLOB_TAIL));
    const { vm, state } = await startInstance({
      root: opts.root,
      base,
      iid,
      memory: { incoming: { from: 'file', path: join(dir, 'memory.sparse') }, sparse: true },
      forwards: opts.forwards,
      accel: opts.accel,
      detach: true,
      overlay: '',
      qemuArgs: opts.qemuArgs,
      diskOptions: (opts.discard ?? true) ? { discard: 'unmap', detectZeroes: 'unmap' } : undefined,
    });
    await vm.qmp.close();
    const thaw = vm.spec.guestAgent ? await thawAfterResume(vm.paths.agentSocket).catch(() => undefined) : undefined;
    unregister();
    return {
      message_type: 'launch',
      instance: iid,
      base_id: id,
      pid: vm.pid,
      accel: vm.accel,
      dir,
      qmp_socket: state.qmp_socket,
      serial_socket: state.serial_socket,
      ...(state.agent_socket ? { agent_socket: state.agent_socket } : {}),
      forwards: opts.forwards,
      ...(thaw ? { guest_thaw: thaw } : {}),
    };
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    unregister();
    throw err;
  } finally {
    await base.close();
  }
}
