/**
 * Leftovers of runs that were killed (kill -9, power loss, OOM): the next run sweeps them, and
 * `base gc` shows (and removes) them. What counts as a leftover is decided by the name alone:
 * temporary and staging names carry their owner (util/owner.ts), and only entries whose owner
 * is gone are touched, so concurrent runs never lose their work.
 *
 * - <root>/tmp/*: imports, package checks, downloads, captures, removals in progress;
 * - <root>/locks/*.lock: base locks of processes that are gone;
 * - <root>/instances/<iid>/ without state.json whose creating process is gone (a synthesize or
 *   launch killed before it recorded the instance), with the QEMU it may have started;
 * - dead instances (state.json, QEMU gone) are listed, and removed only with `--instances`.
 */
import { readdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { tmpDir } from '../base/paths.js';
import { sweepLocks } from '../base/locks.js';
import { abandonedInstanceDir, instancesDir, listInstances } from '../instance/state.js';
import { ownerIsDead, ownerOf, processStart } from '../util/owner.js';

export interface Leftover {
  path: string;
  kind: 'tmp' | 'lock' | 'instance' | 'dead_instance';
  /** Bytes it occupies on disk. */
  bytes: number;
  removed: boolean;
}

export interface GcResult {
  message_type: 'base_gc';
  leftovers: Leftover[];
  /** Bytes freed (or, with dry_run, that would be). */
  bytes: number;
  dry_run: boolean;
}

async function duBytes(path: string): Promise<number> {
  const st = await stat(path).catch(() => undefined);
  if (!st) return 0;
  if (!st.isDirectory()) return st.blocks * 512;
  let total = 0;
  for (const e of await readdir(path, { withFileTypes: true, recursive: true }).catch(() => [])) {
    if (e.isFile()) total += ((await stat(join(e.parentPath, e.name)).catch(() => undefined))?.blocks ?? 0) * 512;
  }
  return total;
}

/** An entry of tmp/ is a leftover when its owner is gone (legacy `rm-<id>-<pid>`: that pid). */
async function tmpIsLeftover(name: string): Promise<boolean> {
  if (ownerOf(name)) return ownerIsDead(name);
  const legacy = /^rm-[0-9a-f]{64}-(\d+)$/.exec(name);
  return legacy ? (await processStart(Number(legacy[1]))) === undefined : false;
}

/** Kills (SIGKILL) the QEMU processes whose command line names `dir` (orphans of a killed run). */
async function killQemuUsing(dir: string): Promise<void> {
  const victims: number[] = [];
  for (const name of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    const cmd = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes('qemu') && cmd.includes(`${dir}/`)) victims.push(Number(name));
  }
  for (const pid of victims) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  for (let i = 0; i < 40 && victims.some((p) => p > 0); i++) {
    let alive = false;
    for (const pid of victims) if ((await processStart(pid)) !== undefined) alive = true;
    if (!alive) break;
    await sleep(25);
  }
}

/**
 * Finds (and unless `dryRun` removes) the leftovers of dead runs. Cheap when there are none (a
 * few readdirs): the operations that use the library call it on start.
 */
export async function sweepLibrary(
  root: string,
  opts: { dryRun?: boolean; deadInstances?: boolean } = {},
): Promise<Leftover[]> {
  const dry = opts.dryRun ?? false;
  const out: Leftover[] = [];
  const take = async (path: string, kind: Leftover['kind'], remove: () => Promise<void>): Promise<void> => {
    const bytes = await duBytes(path);
    if (!dry) await remove().catch(() => undefined);
    out.push({ path, kind, bytes, removed: !dry });
  };
  const tmp = tmpDir(root);
  for (const name of await readdir(tmp).catch(() => [] as string[])) {
    if (!(await tmpIsLeftover(name))) continue;
    await take(join(tmp, name), 'tmp', () => rm(join(tmp, name), { recursive: true, force: true }));
  }
  for (const path of await sweepLocks(root, dry)) out.push({ path, kind: 'lock', bytes: 0, removed: !dry });
  const inst = instancesDir(root);
  for (const name of await readdir(inst).catch(() => [] as string[])) {
    const dir = join(inst, name);
    if (!(await abandonedInstanceDir(dir))) continue;
    await take(dir, 'instance', async () => {
      await killQemuUsing(dir);
      await rm(dir, { recursive: true, force: true });
    });
  }
  for (const i of await listInstances(root)) {
    if (i.status !== 'dead') continue;
    const remove = (opts.deadInstances ?? false) && !dry;
    out.push({ path: i.dir, kind: 'dead_instance', bytes: await duBytes(i.dir), removed: remove });
    if (remove) await rm(i.dir, { recursive: true, force: true });
  }
  return out;
}

/** `base gc`: the leftovers found and removed (or only found, with dryRun). */
export async function gcLibrary(root: string, opts: { dryRun?: boolean; instances?: boolean } = {}): Promise<GcResult> {
  const leftovers = await sweepLibrary(root, { dryRun: opts.dryRun, deadInstances: opts.instances });
  return {
    message_type: 'base_gc',
    leftovers,
    bytes: leftovers.filter((l) => l.removed || opts.dryRun).reduce((n, l) => n + l.bytes, 0),
    dry_run: opts.dryRun ?? false,
  };
}
