/**
 * Which QEMU accelerator to use. `/dev/kvm` existing proves nothing: on some hosts (nested
 * sandboxes) KVM opens, runs real-mode firmware, then hangs as soon as the guest enables paging
 * and long mode. So the probe runs a tiny guest that does exactly that: a 64 KiB firmware
 * (source: kvm-probe.S beside this file) goes real mode → long mode with identity-mapped 2 MiB
 * pages, writes and reads back three pages, and reports through QEMU's isa-debug-exit device
 * (exit status 85 = success). Working KVM answers in ~50 ms; a broken one hangs until the
 * probe's deadline. The answer is cached per process and, so that every CLI run does not pay
 * the deadline again, in `$XDG_CACHE_HOME/cloudlet-overlay/kvm-probe.json`, keyed on the boot
 * (kernel boot_id) and the QEMU binary (path, size, mtime): a reboot or a QEMU upgrade re-probes.
 */
import { spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { access, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeFileAtomic } from '../util/atomic.js';
import { UsageError } from '../util/errors.js';
import { locateProgram } from '../util/programs.js';

export type Accel = 'kvm' | 'tcg';
export type AccelChoice = Accel | 'auto';

export interface KvmProbeResult {
  usable: boolean;
  /** Why not, in one line (empty when usable). */
  reason: string;
  elapsedMs: number;
}

/** Code of kvm-probe.S, assembled (`as --64; ld -Ttext=0 --oformat binary`), offset 0. */
const PROBE_CODE_HEX =
  'fa31c08ed88ec08ed0bc0070bf00106631c0b9000cfc66f3ab66c70600100320000066c7060020033000' +
  '0066c70600308300000066c70608308300200066c70610308300400066c706183083006000b800f08ed8' +
  '660f0116080131c08ed80f20e06683c8200f22e066b8001000000f22d866b9800000c00f32660d000100' +
  '000f300f20c0660d010000800f22c066ea95000f00080066b810008ed88ec08ed048b8785634125a5a5a' +
  '5abf00002000488907bf00004000488907bf00006000488907bf00002000483b077518bf00004000483b' +
  '07750ebf00006000483b077504b02ae6f4b013e6f4f4ebfd8db400006690000000000000000000000000' +
  '009a200000000000009200001700f0000f00';
/** The reset vector at 0xfff0: ljmp $0xf000, $start. */
const PROBE_RESET_HEX = 'ea000000f0';
/** isa-debug-exit turns the byte written to port 0xf4 into exit status (v << 1) | 1. */
const PROBE_OK_STATUS = (0x2a << 1) | 1;

/** Builds the 64 KiB probe firmware image. */
export function kvmProbeFirmware(): Buffer {
  const image = Buffer.alloc(0x10000);
  Buffer.from(PROBE_CODE_HEX, 'hex').copy(image, 0);
  Buffer.from(PROBE_RESET_HEX, 'hex').copy(image, 0xfff0);
  return image;
}

let cached: Promise<KvmProbeResult> | null = null;

export interface ProbeOptions {
  qemuBinary?: string;
  /** How long the test guest may take. Default 1500 ms (working KVM: < 100 ms). */
  timeoutMs?: number;
  /** Use and update the on-disk cache. Default true. */
  diskCache?: boolean;
}

/** Whether KVM really runs a long-mode guest here; probed once per process (and boot). */
export function probeKvm(options: ProbeOptions = {}): Promise<KvmProbeResult> {
  cached ??= probeCached(
    options.qemuBinary ?? 'qemu-system-x86_64',
    options.timeoutMs ?? 1500,
    options.diskCache ?? true,
  );
  return cached;
}

interface DiskCacheEntry {
  key: string;
  result: KvmProbeResult;
}

function cacheFile(): string {
  const base = process.env['XDG_CACHE_HOME'] || join(homedir(), '.cache');
  return join(base, 'cloudlet-overlay', 'kvm-probe.json');
}

/** What invalidates a cached answer: this boot, this QEMU binary, this /dev/kvm. */
async function cacheKey(qemuBinary: string): Promise<string | null> {
  try {
    const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
    const path = await locateProgram(qemuBinary);
    if (!path) return null;
    const st = await stat(path);
    const kvm = await stat('/dev/kvm').catch(() => null);
    return [bootId, path, st.size, st.mtimeMs, kvm ? `${kvm.rdev}:${kvm.mode}` : 'none'].join('|');
  } catch {
    return null;
  }
}

async function probeCached(qemuBinary: string, timeoutMs: number, useDisk: boolean): Promise<KvmProbeResult> {
  const key = useDisk ? await cacheKey(qemuBinary) : null;
  if (key) {
    try {
      const entry = JSON.parse(await readFile(cacheFile(), 'utf8')) as DiskCacheEntry;
      if (entry.key === key && typeof entry.result?.usable === 'boolean') return entry.result;
    } catch {
      // no cache yet, or unreadable: probe
    }
  }
  const result = await runProbe(qemuBinary, timeoutMs);
  // A failure to even run QEMU is not a fact about KVM: do not remember it.
  if (key && !result.reason.startsWith('cannot run')) {
    try {
      await mkdir(join(cacheFile(), '..'), { recursive: true });
      await writeFileAtomic(cacheFile(), JSON.stringify({ key, result } satisfies DiskCacheEntry) + '\n');
    } catch {
      // read-only home: the per-process cache still holds
    }
  }
  return result;
}

/**
 * Resolves the accelerator: 'auto' picks KVM when the probe says it works, else TCG;
 * 'kvm' fails with a UsageError saying why KVM is unusable; 'tcg' is taken as is.
 * The environment variable CLOUDLET_ACCEL (auto|kvm|tcg) overrides 'auto'.
 */
export async function resolveAccel(choice: AccelChoice = 'auto', options: ProbeOptions = {}): Promise<Accel> {
  let want = choice;
  if (want === 'auto') {
    const env = process.env['CLOUDLET_ACCEL'];
    if (env === 'kvm' || env === 'tcg') want = env;
  }
  if (want === 'tcg') return 'tcg';
  const probe = await probeKvm(options);
  if (want === 'kvm') {
    if (!probe.usable) {
      throw new UsageError(`KVM was requested but is not usable here: ${probe.reason}; use --accel tcg`, {
        reason: probe.reason,
      });
    }
    return 'kvm';
  }
  return probe.usable ? 'kvm' : 'tcg';
}

async function runProbe(qemuBinary: string, timeoutMs: number): Promise<KvmProbeResult> {
  const started = Date.now();
  const result = (usable: boolean, reason: string): KvmProbeResult => ({
    usable,
    reason,
    elapsedMs: Date.now() - started,
  });
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch (err) {
    return result(false, `/dev/kvm is not accessible (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  const dir = await mkdtemp(join(tmpdir(), 'cloudlet-kvm-probe-'));
  try {
    const firmware = join(dir, 'probe.bin');
    await writeFile(firmware, kvmProbeFirmware());
    const args = [
      '-machine',
      'pc-q35-7.2',
      '-accel',
      'kvm',
      '-m',
      '16',
      '-cpu',
      'qemu64',
      '-nodefaults',
      '-no-user-config',
      '-display',
      'none',
      '-no-reboot',
      '-monitor',
      'none',
      '-serial',
      'none',
      '-parallel',
      'none',
      '-bios',
      firmware,
      '-device',
      'isa-debug-exit,iobase=0xf4,iosize=0x04',
    ];
    const outcome = await new Promise<{
      status: number | null;
      stderr: string;
      timedOut: boolean;
      spawnError?: string;
    }>((resolve) => {
      let stderr = '';
      let timedOut = false;
      const child = spawn(qemuBinary, args, { stdio: ['ignore', 'ignore', 'pipe'] });
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (d: string) => {
        if (stderr.length < 4096) stderr += d;
      });
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, timeoutMs);
      child.on('error', (err) => {
        clearTimeout(timer);
        resolve({ status: null, stderr, timedOut, spawnError: err.message });
      });
      child.on('close', (status) => {
        clearTimeout(timer);
        resolve({ status, stderr, timedOut });
      });
    });
    if (outcome.spawnError) return result(false, `cannot run ${qemuBinary}: ${outcome.spawnError}`);
    if (outcome.timedOut) {
      return result(false, `a KVM test guest did not reach long mode within ${timeoutMs} ms (KVM hangs on this host)`);
    }
    if (outcome.status === PROBE_OK_STATUS) return result(true, '');
    const lastLine =
      outcome.stderr
        .trim()
        .split('\n')
        .filter((l) => !/warning:/.test(l))
        .pop() ?? '';
    return result(
      false,
      `a KVM test guest failed (exit ${outcome.status ?? 'signal'})${lastLine ? `: ${lastLine}` : ''}`,
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
