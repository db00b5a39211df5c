/**
 * The VM spec is data, never code. A spec that arrives with a base (a package's manifest, a
 * snapshot directory's vm.json) is parsed here against a closed list of fields we understand,
 * each value checked against a pattern, an enum or bounds; anything else is refused, naming the
 * field. Nothing from a base reaches QEMU's command line outside this list: raw QEMU options
 * come only from the operator on the host's command line (`--qemu-arg`), never from a base.
 *
 * Three forms of one VmSpec:
 * - `input`: what a local import reads (vm.json of `snapshot`): kernel, initrd and NIC option ROM
 *   are host paths the import copies into the base directory;
 * - `stored`: what a base's manifest holds: those files are the fixed names `kernel`, `initrd`,
 *   `romfile` inside the base directory, no host-side parts (forwards, RAM backend, incoming);
 * - `runtime`: what QEMU is started with (absolute paths we made): checkRuntimeSpec() checks the
 *   values that reach argv as option strings, so none can smuggle in another option.
 *
 * The stored spec's digest (specDigest) is part of the base id (delta/target.ts baseIdOf), so a
 * changed spec is a different base: refused by the id check on import and on every open.
 */
import { createHash } from 'node:crypto';
import { lstat, realpath } from 'node:fs/promises';
import { isAbsolute, join, sep } from 'node:path';
import { CorruptInputError, UnsupportedError } from '../util/errors.js';
import type { DriveSpec, NetworkSpec, PortForward, VmSpec } from './vm-spec.js';

export type SpecForm = 'input' | 'stored' | 'runtime';

/** Pinned machine types, e.g. pc-q35-7.2, pc-i440fx-7.2, microvm is not pinned (refused). */
export const MACHINE = /^[a-z][a-z0-9.-]{0,40}-\d{1,3}\.\d{1,3}$/;
/** A CPU model with optional properties: qemu64, Skylake-Client-v4, host,+ssse3,-x2apic,pmu=off. */
export const CPU = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(,[+-]?[A-Za-z0-9_.-]{1,64}(=[A-Za-z0-9_.-]{1,64})?){0,64}$/;
/** A NIC model: virtio-net-pci, e1000, e1000e, rtl8139, ne2k_pci, vmxnet3, … (no options). */
export const NIC_MODEL = /^[a-z0-9][a-z0-9_-]{0,31}$/;
export const MAC = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/;
export const DRIVE_ID = /^[A-Za-z][A-Za-z0-9_-]{0,31}$/;
export const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** A host address of a port forward: IPv4 (QEMU's hostfwd takes no IPv6 here). */
export const HOST_ADDR = /^(\d{1,3}\.){3}\d{1,3}$/;
/** Stored specs accept tiny synthetic VMs; QEMU itself is given at least 16 MiB (vm-spec.ts). */
export const MIN_MEMORY_MIB = 1;
export const MAX_MEMORY_MIB = 1 << 20;
export const MAX_SMP = 256;
export const MAX_APPEND = 4096;
export const MAX_DRIVES = 8;
export const DRIVE_FORMATS: readonly DriveSpec['format'][] = ['raw', 'qcow2'];
export const DRIVE_IFS: readonly DriveSpec['if'][] = ['virtio', 'ide', 'none'];
export const CACHE_MODES: ReadonlyArray<NonNullable<DriveSpec['cache']>> = [
  'writeback',
  'none',
  'writethrough',
  'directsync',
  'unsafe',
];
/** The files a stored spec may name, each at a fixed name in the base directory. */
export const SPEC_FILES = ['kernel', 'initrd', 'romfile'] as const;
export type SpecFile = (typeof SPEC_FILES)[number];

const SPEC_KEYS = new Set([
  'machine',
  'memoryMiB',
  'cpu',
  'smp',
  'kernel',
  'initrd',
  'append',
  'drives',
  'network',
  'noReboot',
  'name',
  'guestAgent',
  // host-side, never stored:
  'memoryBackendFile',
  'incoming',
  'extraArgs',
]);
const DRIVE_KEYS = new Set(['file', 'format', 'if', 'id', 'readOnly', 'cache', 'discard', 'detectZeroes']);
const DISCARD_MODES: readonly NonNullable<DriveSpec['discard']>[] = ['unmap', 'ignore'];
const DETECT_ZEROES: readonly NonNullable<DriveSpec['detectZeroes']>[] = ['off', 'on', 'unmap'];
const NETWORK_KEYS = new Set(['model', 'romfile', 'mac', 'forwards']);
const FORWARD_KEYS = new Set(['hostAddr', 'hostPort', 'guestPort']);

type Obj = { [key: string]: unknown };

function fail(field: string, what: string): never {
  throw new CorruptInputError(`VM spec: ${field}: ${what}`, { field });
}

function obj(v: unknown, field: string, keys: ReadonlySet<string>): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(field, 'expected an object');
  for (const k of Object.keys(v)) {
    if (!keys.has(k)) fail(field ? `${field}.${k}` : k, 'not a field this tool understands (refused)');
  }
  return v as Obj;
}

function str(v: unknown, field: string, pattern?: RegExp): string {
  if (typeof v !== 'string') fail(field, 'expected a string');
  if (pattern && !pattern.test(v)) fail(field, `${JSON.stringify(v.slice(0, 80))} is not allowed`);
  return v;
}

function int(v: unknown, field: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max)
    fail(field, `expected an integer ${min}..${max}`);
  return v;
}

function bool(v: unknown, field: string): boolean {
  if (typeof v !== 'boolean') fail(field, 'expected true or false');
  return v;
}

function oneOf<T extends string>(v: unknown, field: string, allowed: readonly T[]): T {
  if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v))
    fail(field, `expected one of ${allowed.join(', ')}`);
  return v as T;
}

/** A path of a file the spec names: fixed names when stored, absolute when run, any when input. */
function filePath(v: unknown, field: string, form: SpecForm, stored: string): string {
  const p = str(v, field);
  // eslint-disable-next-line no-control-regex
  if (p.length === 0 || p.length > 4096 || /[\u0000-\u001f]/.test(p)) fail(field, 'not a usable path');
  if (form === 'stored' && p !== stored) fail(field, `must be ${JSON.stringify(stored)} (a file of the base)`);
  if (form === 'runtime' && !isAbsolute(p)) fail(field, 'must be an absolute path');
  return p;
}

function forward(v: unknown, field: string): PortForward {
  const o = obj(v, field, FORWARD_KEYS);
  const f: PortForward = {
    hostPort: int(o.hostPort, `${field}.hostPort`, 1, 65535),
    guestPort: int(o.guestPort, `${field}.guestPort`, 1, 65535),
  };
  if (o.hostAddr !== undefined) f.hostAddr = str(o.hostAddr, `${field}.hostAddr`, HOST_ADDR);
  return f;
}

/**
 * Parses a spec from untrusted JSON against the closed list, in the given form. Returns a new
 * object holding only the fields checked. Errors: CorruptInputError naming the field;
 * UnsupportedError for `extraArgs` (raw QEMU options), with what to do instead.
 */
export function parseSpec(v: unknown, form: SpecForm): VmSpec {
  const o = obj(v, '', SPEC_KEYS);
  if (o.extraArgs !== undefined) {
    const args = Array.isArray(o.extraArgs) ? o.extraArgs.map((a) => String(a)).join(' ') : '?';
    throw new UnsupportedError(
      `VM spec: extraArgs (raw QEMU options: ${args.slice(0, 200)}) cannot be part of a base; remove them from ` +
        'the spec and give them on the host instead: launch/synthesize --qemu-arg',
      { field: 'extraArgs' },
    );
  }
  if (form !== 'runtime') {
    for (const k of ['memoryBackendFile', 'incoming'] as const) {
      if (o[k] !== undefined) fail(k, 'host-side, not part of a base');
    }
  }
  const spec: VmSpec = {
    machine: str(o.machine, 'machine', MACHINE),
    memoryMiB: int(o.memoryMiB, 'memoryMiB', MIN_MEMORY_MIB, MAX_MEMORY_MIB),
  };
  if (o.cpu !== undefined) spec.cpu = str(o.cpu, 'cpu', CPU);
  if (o.smp !== undefined) spec.smp = int(o.smp, 'smp', 1, MAX_SMP);
  if (o.kernel !== undefined) spec.kernel = filePath(o.kernel, 'kernel', form, 'kernel');
  if (o.initrd !== undefined) spec.initrd = filePath(o.initrd, 'initrd', form, 'initrd');
  if (o.append !== undefined) {
    const a = str(o.append, 'append');
    // eslint-disable-next-line no-control-regex
    if (a.length > MAX_APPEND || /[\u0000-\u001f\u007f]/.test(a))
      fail('append', `at most ${MAX_APPEND} printable characters`);
    spec.append = a;
  }
  if ((spec.initrd !== undefined || spec.append !== undefined) && spec.kernel === undefined) {
    fail('kernel', 'initrd/append need a kernel');
  }
  if (o.drives !== undefined) {
    if (!Array.isArray(o.drives) || o.drives.length > MAX_DRIVES)
      fail('drives', `expected at most ${MAX_DRIVES} drives`);
    spec.drives = o.drives.map((d: unknown, i) => {
      const f = `drives[${i}]`;
      const x = obj(d, f, DRIVE_KEYS);
      const drive: DriveSpec = {
        // A stored drive names the base disk; the caller checks which (manifest.disk.file).
        file: filePath(x.file, `${f}.file`, form === 'stored' ? 'input' : form, ''),
        format: oneOf(x.format, `${f}.format`, DRIVE_FORMATS),
        if: oneOf(x.if, `${f}.if`, DRIVE_IFS),
      };
      if (x.id !== undefined) drive.id = str(x.id, `${f}.id`, DRIVE_ID);
      if (x.readOnly !== undefined) drive.readOnly = bool(x.readOnly, `${f}.readOnly`);
      if (x.cache !== undefined) drive.cache = oneOf(x.cache, `${f}.cache`, CACHE_MODES);
      // Host-side (what QEMU does with discards): read from a launched VM, never stored.
      if (form !== 'stored') {
        if (x.discard !== undefined) drive.discard = oneOf(x.discard, `${f}.discard`, DISCARD_MODES);
        if (x.detectZeroes !== undefined) {
          drive.detectZeroes = oneOf(x.detectZeroes, `${f}.detectZeroes`, DETECT_ZEROES);
        }
      } else if (x.discard !== undefined || x.detectZeroes !== undefined) {
        fail(f, 'discard/detectZeroes are host-side and not stored');
      }
      return drive;
    });
  }
  if (o.network !== undefined) {
    const n = obj(o.network, 'network', NETWORK_KEYS);
    const net: NetworkSpec = { forwards: [] };
    if (n.model !== undefined) net.model = str(n.model, 'network.model', NIC_MODEL);
    if (n.romfile !== undefined) {
      net.romfile = n.romfile === '' ? '' : filePath(n.romfile, 'network.romfile', form, 'romfile');
    }
    if (n.mac !== undefined) net.mac = str(n.mac, 'network.mac', MAC);
    if (n.forwards !== undefined) {
      if (!Array.isArray(n.forwards) || n.forwards.length > 64)
        fail('network.forwards', 'expected at most 64 forwards');
      net.forwards = n.forwards.map((f: unknown, i) => forward(f, `network.forwards[${i}]`));
      if (form === 'stored' && net.forwards.length > 0) fail('network.forwards', 'host-side, not part of a base');
    }
    spec.network = net;
  }
  if (o.noReboot !== undefined) spec.noReboot = bool(o.noReboot, 'noReboot');
  if (o.guestAgent !== undefined) spec.guestAgent = bool(o.guestAgent, 'guestAgent');
  if (o.name !== undefined) spec.name = str(o.name, 'name', VM_NAME);
  if (form === 'runtime') {
    if (o.incoming !== undefined) {
      const inc = obj(o.incoming, 'incoming', new Set(['from', 'path']));
      spec.incoming = {
        from: oneOf(inc.from, 'incoming.from', ['file', 'unix'] as const),
        path: filePath(inc.path, 'incoming.path', form, ''),
      };
    }
    if (o.memoryBackendFile !== undefined) {
      const m = obj(o.memoryBackendFile, 'memoryBackendFile', new Set(['path', 'share']));
      spec.memoryBackendFile = {
        path: filePath(m.path, 'memoryBackendFile.path', form, ''),
        share: bool(m.share, 'share'),
      };
    }
  }
  return spec;
}

/**
 * The checks of a spec about to become QEMU's argv (vm/argv.ts calls it through validateSpec):
 * every value that lands inside an option string has its pattern or enum, so none can add an
 * option of its own; no raw options. Fields this module does not know (a newer runtime form)
 * are left to their own checks.
 */
export function checkRuntimeSpec(spec: VmSpec): void {
  const s = spec as VmSpec & { [key: string]: unknown };
  if (s.extraArgs !== undefined && s.extraArgs.length > 0) {
    throw new UnsupportedError('VM spec: extraArgs are not run; host options go through --qemu-arg', {
      field: 'extraArgs',
    });
  }
  if (spec.cpu !== undefined) str(spec.cpu, 'cpu', CPU);
  if (spec.name !== undefined) str(spec.name, 'name', VM_NAME);
  spec.drives?.forEach((d, i) => {
    oneOf(d.format, `drives[${i}].format`, DRIVE_FORMATS);
    oneOf(d.if, `drives[${i}].if`, DRIVE_IFS);
    if (d.id !== undefined) str(d.id, `drives[${i}].id`, DRIVE_ID);
    if (d.cache !== undefined) oneOf(d.cache, `drives[${i}].cache`, CACHE_MODES);
    if (d.discard !== undefined) oneOf(d.discard, `drives[${i}].discard`, DISCARD_MODES);
    if (d.detectZeroes !== undefined) oneOf(d.detectZeroes, `drives[${i}].detectZeroes`, DETECT_ZEROES);
    if (d.backing?.kind === 'image') oneOf(d.backing.format, `drives[${i}].backing.format`, DRIVE_FORMATS);
    if (d.backing?.kind === 'nbd') str(d.backing.export, `drives[${i}].backing.export`, DRIVE_ID);
  });
  const n = spec.network;
  if (n) {
    if (n.model !== undefined) str(n.model, 'network.model', NIC_MODEL);
    if (n.mac !== undefined) str(n.mac, 'network.mac', MAC);
    n.forwards.forEach((f, i) => {
      if (f.hostAddr !== undefined) str(f.hostAddr, `network.forwards[${i}].hostAddr`, HOST_ADDR);
    });
  }
}

/**
 * The stored form of an input spec (as a library import writes it): host-side parts dropped,
 * the files it names at their fixed names (`sources` says where each comes from), drive 0 the
 * base's disk (`disk`, or no drive without one). Pure: the import copies the sources, a base
 * given as files (create/apply --base-vm) only hashes them; both get the same digest.
 */
export function storedSpecOf(
  input: VmSpec,
  disk: { file: string; format: DriveSpec['format'] } | undefined,
): { spec: VmSpec; sources: { [K in SpecFile]?: string } } {
  const { incoming: _i, memoryBackendFile: _m, extraArgs: _e, ...vm } = input;
  const sources: { [K in SpecFile]?: string } = {};
  if (vm.kernel) {
    sources.kernel = vm.kernel;
    vm.kernel = 'kernel';
  }
  if (vm.initrd) {
    sources.initrd = vm.initrd;
    vm.initrd = 'initrd';
  }
  if (vm.network) {
    vm.network = { ...vm.network, forwards: [] };
    if (vm.network.romfile) {
      sources.romfile = vm.network.romfile;
      vm.network.romfile = 'romfile';
    }
  }
  if (vm.drives?.[0] && disk) {
    const { discard: _d, detectZeroes: _z, ...drive } = vm.drives[0];
    vm.drives = [{ ...drive, file: disk.file, format: disk.format }];
  } else delete vm.drives;
  return { spec: parseSpec(vm, 'stored'), sources };
}

/** Without host-side parts (forwards, RAM backend, incoming): what an input spec may carry. */
export function withoutHostSide(vm: VmSpec): VmSpec {
  const { incoming: _i, memoryBackendFile: _m, ...rest } = vm;
  if (rest.network) rest.network = { ...rest.network, forwards: [] };
  if (rest.drives) rest.drives = rest.drives.map(({ discard: _d, detectZeroes: _z, ...d }) => d);
  return rest;
}

/** Files a stored spec names, with their digests (recorded in the manifest as `vm_files`). */
export type SpecFileDigests = { [K in SpecFile]?: { sha256: string; size: number } };

/** The files a stored spec names, by their fixed names. */
export function specFiles(spec: VmSpec): SpecFile[] {
  const out: SpecFile[] = [];
  if (spec.kernel !== undefined) out.push('kernel');
  if (spec.initrd !== undefined) out.push('initrd');
  if (spec.network?.romfile) out.push('romfile');
  return out;
}

/** JSON with sorted keys: the same spec always gives the same bytes. */
export function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`;
  if (typeof v === 'object' && v !== null) {
    const o = v as Obj;
    const keys = Object.keys(o)
      .filter((k) => o[k] !== undefined)
      .sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(o[k])}`).join(',')}}`;
  }
  return JSON.stringify(v);
}

/**
 * The digest of a stored spec and the files it names: what the base id covers besides the
 * targets (docs/FORMAT.md "Base id"). `files` must hold an entry for every file the spec names.
 */
export function specDigest(spec: VmSpec, files: SpecFileDigests): string {
  const named: SpecFileDigests = {};
  for (const f of specFiles(spec)) {
    const d = files[f];
    if (!d) throw new CorruptInputError(`VM spec names ${f}, but its digest is missing`);
    named[f] = d;
  }
  return createHash('sha256')
    .update('cloudlet-overlay vm spec v1\0')
    .update(canonicalJson({ vm: spec, files: named }))
    .digest('hex');
}

/**
 * The path of a file inside a base directory, refused unless it stays there: a plain relative
 * name, no `..`, not a symlink, and its real path inside the directory's real path.
 */
export async function confinedFile(dir: string, rel: string): Promise<string> {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]*(\/[A-Za-z0-9][A-Za-z0-9._-]*)*$/.test(rel) || rel.split('/').includes('..')) {
    throw new CorruptInputError(`base file ${JSON.stringify(rel)} is not a plain name inside the base`, { path: rel });
  }
  const path = join(dir, rel);
  const st = await lstat(path).catch(() => undefined);
  if (!st) throw new CorruptInputError(`base file ${rel} is missing`, { path });
  if (!st.isFile()) throw new CorruptInputError(`base file ${rel} is not a regular file (a link?)`, { path });
  const [real, root] = await Promise.all([realpath(path), realpath(dir)]);
  if (!real.startsWith(root + sep)) throw new CorruptInputError(`base file ${rel} leaves the base directory`, { path });
  return path;
}
