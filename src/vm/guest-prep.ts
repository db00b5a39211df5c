/**
 * Getting a guest ready for a snapshot whose overlay should carry only what the guest still
 * uses (docs/semantic-gap.md): drop its page cache, overwrite its free memory with zeros (free
 * pages keep the bytes of deleted files and dropped caches), trim its file systems (discarded blocks
 * become zero clusters of a drive opened with discard=unmap), freeze them (the on-disk
 * allocation bitmaps become current, so `create --free-blocks` may trust them). Each step goes
 * through the QEMU guest agent when the guest runs one, else through the serial console as
 * shell commands (Linux: busybox or util-linux fstrim/fsfreeze).
 *
 * A frozen guest stays frozen in its memory snapshot, so every resume of it must thaw it. With
 * the agent, whoever resumes thaws (thawAfterResume: snapshot --then resume, synthesize,
 * launch). Over the console nobody could know, so the guest thaws itself: before freezing, it
 * starts a background timer (`sleep W; fsfreeze --unfreeze …`) that runs on in the snapshot —
 * in guest time, which stands still while the VM is stopped — and thaws every resume of it
 * W seconds after it runs. If the host took longer than W to stop the VM, the snapshot's file
 * systems are simply not frozen: untrusted, and the overlay stays exact.
 */
import { QemuError, UsageError } from '../util/errors.js';
import { GuestAgent } from './guest-agent.js';
import { SerialConsole } from './console.js';

export interface GuestPrepOptions {
  dropCaches?: boolean;
  /** Fill the guest's free memory with zeros and free it again (Linux: a tmpfs), so free pages cost nothing. */
  zeroFreeMemory?: boolean;
  trim?: boolean;
  freeze?: boolean;
  /** How: the guest agent, the serial console, or auto (the agent when one answers). */
  via?: 'agent' | 'console' | 'auto';
  /** Console freezes thaw themselves after this many seconds of guest time. Default 3. */
  freezeWindowS?: number;
}

export interface GuestChannels {
  /** The agent channel's host socket, when the VM has one. */
  agentSocket?: string;
  /** The serial console's socket (or pty), when known. */
  serialSocket?: string;
}

export interface GuestPrepReport {
  channel: 'agent' | 'console';
  dropped_caches?: boolean;
  /** MiB of free memory overwritten with zeros. */
  zeroed_mib?: number;
  /** Bytes the guest reported trimmed, when it says (the agent, `fstrim -v`). */
  trimmed_bytes?: number;
  /** Mount points frozen (console), or their number (agent). */
  frozen?: string[] | number;
  /** Console freezes: the guest thaws itself this many seconds after it runs again. */
  self_thaw_s?: number;
  timings_ms: { [step: string]: number };
}

/** A prepared guest: what was done, and what to do once the snapshot is taken. */
export interface PreparedGuest {
  report: GuestPrepReport;
  /** Thaws an agent-frozen guest that keeps running; the number thawed (0: nothing to do). */
  thaw(): Promise<number>;
  close(): Promise<void>;
}

/** Mount points worth trimming: real block file systems of /proc/mounts. */
const MOUNTS = `$(awk '$3 ~ /^(ext[234]|xfs|btrfs|f2fs|vfat)$/ {print $2}' /proc/mounts)`;
/** Mount points that can be frozen (vfat cannot: an EFI partition must not fail the freeze). */
const FREEZABLE = `$(awk '$3 ~ /^(ext[234]|xfs|btrfs|f2fs)$/ {print $2}' /proc/mounts)`;

/** The console command lines (one line each; kept under the console's line limit). */
export const consoleScripts = {
  dropCaches: 'sync && echo 3 > /proc/sys/vm/drop_caches',
  // Free pages keep what they held (deleted files, dropped caches): overwrite them. A tmpfs of
  // MemFree minus a reserve (4× min_free_kbytes + 32 MiB, so nothing is reclaimed or OOM-killed)
  // is filled with zeros and unmounted: its pages go back to the free lists holding zeros.
  zeroFree:
    "F=$(awk '/^MemFree:/ {print int($2/1024)}' /proc/meminfo); W=$(awk '{print int($1/1024)}' /proc/sys/vm/min_free_kbytes); " +
    'N=$((F - W * 4 - 32)); Z=0; D=/dev/.cloudlet-zero; if [ $N -gt 0 ] && mkdir -p $D && mount -t tmpfs -o size=${N}m ' +
    'cloudlet-zero $D; then dd if=/dev/zero of=$D/z bs=1M count=$N 2>/dev/null; umount $D && Z=$N; fi; rmdir $D 2>/dev/null; ' +
    'echo "zeroed:$Z"',
  // util-linux trims every mount with -a; busybox's fstrim takes one mount point at a time.
  trim: `sync; fstrim -av 2>/dev/null || { R=0; for m in ${MOUNTS}; do fstrim -v "$m" || R=1; done; [ $R = 0 ]; }`,
  freeze: (windowS: number): string =>
    `sync; M=${FREEZABLE}; (sleep ${windowS}; for m in $M; do fsfreeze --unfreeze "$m"; done) </dev/null >/dev/null 2>&1 & ` +
    'R=0; for m in $M; do fsfreeze --freeze "$m" || R=1; done; echo frozen:$M; [ $R = 0 ]',
};

/** Sums `… N bytes trimmed` / `…: 12 MiB (N bytes) trimmed` lines of fstrim -v. */
export function trimmedBytes(output: string): number | undefined {
  let total = 0;
  let seen = false;
  for (const m of output.matchAll(/(?:\((\d+) bytes\)|(\d+) bytes) trimmed/g)) {
    total += Number(m[1] ?? m[2]);
    seen = true;
  }
  return seen ? total : undefined;
}

/**
 * Runs the requested steps, in the order drop caches → zero free memory → trim → freeze (freeze
 * last: just before the stop).
 */
export async function prepareGuest(ch: GuestChannels, opts: GuestPrepOptions): Promise<PreparedGuest> {
  const via = opts.via ?? 'auto';
  let agent: GuestAgent | undefined;
  if (via !== 'console' && ch.agentSocket) {
    agent = via === 'agent' ? await GuestAgent.connect(ch.agentSocket) : await GuestAgent.tryConnect(ch.agentSocket);
  }
  if (via === 'agent' && !agent)
    throw new UsageError('this VM has no guest agent channel (its VmSpec has no guestAgent)');
  let con: SerialConsole | undefined;
  if (!agent) {
    if (!ch.serialSocket) {
      throw new UsageError('no guest agent answers and the serial console is unknown: cannot reach the guest');
    }
    con = await SerialConsole.connect(ch.serialSocket);
    await con.ready({ timeoutMs: 20_000 }).catch(async (err: unknown) => {
      await con!.close();
      throw err;
    });
  }
  const report: GuestPrepReport = { channel: agent ? 'agent' : 'console', timings_ms: {} };
  const timed = async <T>(step: string, fn: () => Promise<T>): Promise<T> => {
    const t0 = performance.now();
    try {
      return await fn();
    } finally {
      report.timings_ms[step] = Math.round(performance.now() - t0);
    }
  };
  const shell = async (script: string, what: string, timeoutMs: number): Promise<string> => {
    const r = agent ? await agent.shell(script, timeoutMs) : await con!.run(script, { timeoutMs });
    if (r.status !== 0) {
      throw new QemuError(`${what} failed in the guest (status ${r.status}): ${r.output.trim().slice(-500)}`, {
        status: r.status,
      });
    }
    return r.output;
  };
  let frozenByAgent = false;
  try {
    if (opts.dropCaches) {
      await timed('drop_caches', () => shell(consoleScripts.dropCaches, 'dropping the page cache', 120_000));
      report.dropped_caches = true;
    }
    if (opts.zeroFreeMemory) {
      await timed('zero_free_memory', async () => {
        const out = await shell(consoleScripts.zeroFree, 'zeroing free memory', 600_000);
        report.zeroed_mib = Number(/zeroed:(\d+)/.exec(out)?.[1] ?? 0);
      });
    }
    if (opts.trim) {
      await timed('trim', async () => {
        if (agent) {
          // guest-fstrim syncs nothing itself: write dirty data first, so freed blocks are known.
          await agent.shell('sync', 120_000).catch(() => undefined);
          const r = await agent.fstrim();
          const errors = r.paths.filter((p) => p.error);
          if (errors.length === r.paths.length && errors.length > 0) {
            throw new QemuError(`guest-fstrim failed: ${errors.map((p) => `${p.path}: ${p.error}`).join('; ')}`);
          }
          report.trimmed_bytes = r.paths.reduce((n, p) => n + (p.trimmed ?? 0), 0);
        } else {
          report.trimmed_bytes = trimmedBytes(await shell(consoleScripts.trim, 'fstrim', 600_000));
        }
      });
    }
    if (opts.freeze) {
      await timed('freeze', async () => {
        if (agent) {
          // A freeze that failed or timed out may still have frozen some: the catch thaws.
          frozenByAgent = true;
          report.frozen = await agent.freeze();
        } else {
          const w = opts.freezeWindowS ?? 3;
          if (!Number.isInteger(w) || w < 1 || w > 3600) throw new UsageError('the freeze window must be 1..3600 s');
          const out = await shell(consoleScripts.freeze(w), 'fsfreeze', 120_000);
          report.frozen = (/frozen:(.*)/.exec(out)?.[1] ?? '').trim().split(/\s+/).filter(Boolean);
          report.self_thaw_s = w;
        }
      });
    }
  } catch (err) {
    if (frozenByAgent) await agent?.thaw().catch(() => undefined);
    agent?.close();
    await con?.close();
    throw err;
  }
  return {
    report,
    thaw: async () => {
      if (!frozenByAgent || !agent) return 0;
      frozenByAgent = false;
      return agent.thaw();
    },
    close: async () => {
      agent?.close();
      await con?.close();
    },
  };
}

export type ThawOutcome = 'thawed' | 'not-frozen' | 'no-agent';

/**
 * After a resume: thaws a guest whose snapshot was taken frozen through its agent. Waits for
 * the agent at most timeoutMs (a guest without qemu-ga never answers).
 */
export async function thawAfterResume(agentSocket: string, timeoutMs = 5000): Promise<ThawOutcome> {
  const agent = await GuestAgent.tryConnect(agentSocket, timeoutMs);
  if (!agent) return 'no-agent';
  try {
    if ((await agent.fsfreezeStatus()) !== 'frozen') return 'not-frozen';
    await agent.thaw();
    return 'thawed';
  } finally {
    agent.close();
  }
}
