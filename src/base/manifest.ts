/**
 * A base VM's manifest: what it holds and what a resume of it must match. Parsed strictly (a
 * manifest may come in a package from anywhere): known fields only, every value checked, every
 * file at its one canonical place in the base directory (layout in paths.ts), the targets and the
 * file lists consistent with each other, the VM spec against the closed list (spec/validate.ts).
 */
import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import type { TargetInfo, TargetKind } from '../delta/target.js';
import type { VmSpec } from '../spec/vm-spec.js';
import { MACHINE, SPEC_FILES, parseSpec, type SpecFile, type SpecFileDigests } from '../spec/validate.js';
import { CloudletError, CorruptInputError, NotFoundError } from '../util/errors.js';
import { safeName } from '../util/safe-name.js';
import { BLOB_PREFIX, BLOB_START, BLOB_TAIL } from '../targets/blobs.js';

export interface BaseManifest {
  format: 'cloudlet-overlay-base';
  version: 1;
  id: string;
  name?: string;
  created_at: string;
  creator: string;
  /** Targets in overlay order (blobs, disk, RAM blocks) with digests; the id covers them. */
  targets: TargetInfo[];
  disk?: { file: string; format: 'raw' | 'qcow2'; virtual_size: number };
  memory?: {
    machine: string;
    main_block: string;
    ram_section_id: number;
    /** Block name → file under the base directory. */
    files: { [block: string]: string };
    blobs: { prefix: string; start: string; tail: string };
  };
  /**
   * How the base VM runs: machine type, RAM, CPU, devices, kernel/initrd/append. Drive 0 is
   * the disk; files are the fixed names `kernel`, `initrd`, `romfile` in the base directory.
   */
  vm?: VmSpec;
  /** Digests of the files the VM spec names; with the spec they are part of the id. */
  vm_files?: SpecFileDigests;
  /** QEMU version the snapshot was taken with, when known. */
  qemu_version?: string;
}

/** Largest manifest accepted (a real one is a few KiB). */
export const MAX_MANIFEST = 4 << 20;
/** A base name: what `--name` takes and `base list` shows. */
export const BASE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const HEX64 = /^[0-9a-f]{64}$/;
const MAX_TARGETS = 1024;
export const BLOB_FILES = { prefix: 'stream/prefix', start: 'stream/start', tail: 'stream/tail' } as const;

/** The one place of a RAM block's file in a base directory. */
export function ramFileName(block: string): string {
  return `ram/${safeName(block)}.raw`;
}

type Obj = { [key: string]: unknown };

function fail(where: string, what: string): never {
  throw new CorruptInputError(`${where}: ${what}`);
}

function obj(v: unknown, where: string, keys?: readonly string[]): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(where, 'expected an object');
  if (keys) for (const k of Object.keys(v)) if (!keys.includes(k)) fail(`${where}.${k}`, 'unknown field (refused)');
  return v as Obj;
}

function str(v: unknown, where: string, max = 256, pattern?: RegExp): string {
  if (typeof v !== 'string' || v.length > max) fail(where, `expected a string of at most ${max} characters`);
  if (pattern && !pattern.test(v)) fail(where, `${JSON.stringify(v.slice(0, 80))} is not allowed`);
  return v;
}

function int(v: unknown, where: string, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v > max)
    fail(where, 'expected a non-negative integer');
  return v;
}

const KINDS: readonly TargetKind[] = ['disk', 'ram', 'blob'];
const TOP = [
  'format',
  'version',
  'id',
  'name',
  'created_at',
  'creator',
  'targets',
  'disk',
  'memory',
  'vm',
  'vm_files',
  'qemu_version',
];

/** Parses a manifest's bytes; CorruptInputError (naming `where`) for anything not exactly right. */
export function parseManifest(bytes: Buffer, where: string): BaseManifest {
  let v: unknown;
  try {
    v = JSON.parse(bytes.toString('utf8'));
  } catch {
    fail(where, 'not valid JSON');
  }
  const o = obj(v, where);
  if (o.format !== 'cloudlet-overlay-base' || o.version !== 1) fail(where, 'not a cloudlet-overlay base manifest');
  obj(v, where, TOP);
  const m: BaseManifest = {
    format: 'cloudlet-overlay-base',
    version: 1,
    id: str(o.id, `${where}: id`, 64, HEX64),
    created_at: str(o.created_at, `${where}: created_at`, 64),
    creator: str(o.creator, `${where}: creator`, 128),
    targets: [],
  };
  if (o.name !== undefined) m.name = str(o.name, `${where}: name`, 64, BASE_NAME);
  if (o.qemu_version !== undefined) m.qemu_version = str(o.qemu_version, `${where}: qemu_version`, 64);
  if (!Array.isArray(o.targets) || o.targets.length > MAX_TARGETS) fail(`${where}: targets`, 'expected a list');
  m.targets = o.targets.map((t: unknown, i) => {
    const w = `${where}: targets[${i}]`;
    const x = obj(t, w, ['name', 'kind', 'size', 'digest']);
    const kind = str(x.kind, `${w}.kind`) as TargetKind;
    if (!KINDS.includes(kind)) fail(`${w}.kind`, 'unknown kind');
    return {
      name: str(x.name, `${w}.name`),
      kind,
      size: int(x.size, `${w}.size`),
      digest: str(x.digest, `${w}.digest`, 64, HEX64),
    };
  });
  const seen = new Set(m.targets.map((t) => `${t.kind}:${t.name}`));
  if (seen.size !== m.targets.length) fail(`${where}: targets`, 'duplicate target');

  if (o.disk !== undefined) {
    const d = obj(o.disk, `${where}: disk`, ['file', 'format', 'virtual_size']);
    const format =
      d.format === 'raw' || d.format === 'qcow2' ? d.format : fail(`${where}: disk.format`, 'raw or qcow2');
    if (d.file !== `disk.${format}`) fail(`${where}: disk.file`, `must be disk.${format}`);
    m.disk = { file: `disk.${format}`, format, virtual_size: int(d.virtual_size, `${where}: disk.virtual_size`) };
  }
  if (o.memory !== undefined) {
    const w = `${where}: memory`;
    const mem = obj(o.memory, w, ['machine', 'main_block', 'ram_section_id', 'files', 'blobs']);
    const files = obj(mem.files, `${w}.files`);
    const blobs = obj(mem.blobs, `${w}.blobs`, ['prefix', 'start', 'tail']);
    for (const k of ['prefix', 'start', 'tail'] as const) {
      if (blobs[k] !== BLOB_FILES[k]) fail(`${w}.blobs.${k}`, `must be ${BLOB_FILES[k]}`);
    }
    const fileMap: { [block: string]: string } = {};
    for (const [block, file] of Object.entries(files)) {
      if (file !== ramFileName(block)) fail(`${w}.files[${JSON.stringify(block)}]`, `must be ${ramFileName(block)}`);
      fileMap[block] = file;
    }
    const names = Object.values(fileMap);
    if (new Set(names).size !== names.length) fail(`${w}.files`, 'two blocks share a file');
    m.memory = {
      machine: str(mem.machine, `${w}.machine`, 64, MACHINE),
      main_block: str(mem.main_block, `${w}.main_block`),
      ram_section_id: int(mem.ram_section_id, `${w}.ram_section_id`, 0xffffffff),
      files: fileMap,
      blobs: { ...BLOB_FILES },
    };
    if (!(m.memory.main_block in fileMap)) fail(`${w}.main_block`, 'not one of the RAM blocks');
  }
  checkTargets(m, where);
  if (o.vm !== undefined) {
    try {
      m.vm = parseSpec(o.vm, 'stored');
    } catch (err) {
      if (err instanceof CloudletError)
        throw new (err.constructor as typeof CorruptInputError)(`${where}: ${err.message}`, err.details);
      throw err;
    }
    const drive = m.vm.drives?.[0];
    if ((m.vm.drives?.length ?? 0) > 1) fail(`${where}: vm.drives`, 'a base has at most one drive');
    if (drive && (!m.disk || drive.file !== m.disk.file || drive.format !== m.disk.format)) {
      fail(`${where}: vm.drives[0]`, "must be the base's disk");
    }
  }
  if (o.vm_files !== undefined) {
    const vf = obj(o.vm_files, `${where}: vm_files`, SPEC_FILES);
    const out: SpecFileDigests = {};
    for (const [k, v2] of Object.entries(vf)) {
      const e = obj(v2, `${where}: vm_files.${k}`, ['sha256', 'size']);
      out[k as SpecFile] = {
        sha256: str(e.sha256, `${where}: vm_files.${k}.sha256`, 64, HEX64),
        size: int(e.size, `${where}: vm_files.${k}.size`),
      };
    }
    m.vm_files = out;
  }
  return m;
}

/** The targets must be exactly what disk and memory say: blobs and RAM blocks with memory, a disk with a disk. */
function checkTargets(m: BaseManifest, where: string): void {
  const want = new Set<string>();
  if (m.memory) {
    for (const b of [BLOB_PREFIX, BLOB_START, BLOB_TAIL]) want.add(`blob:${b}`);
    for (const block of Object.keys(m.memory.files)) want.add(`ram:${block}`);
  }
  if (m.disk) want.add('disk:disk');
  const have = new Set(m.targets.map((t) => `${t.kind}:${t.name}`));
  if (want.size !== have.size || [...want].some((k) => !have.has(k))) {
    fail(`${where}: targets`, 'do not match the disk and memory the manifest lists');
  }
  const disk = m.targets.find((t) => t.kind === 'disk');
  if (disk && m.disk && disk.size !== m.disk.virtual_size) fail(`${where}: disk`, 'size differs from its target');
}

/** Reads and parses a manifest file (O_NONBLOCK: a FIFO never blocks; it is refused). */
export async function readManifestBytes(path: string): Promise<Buffer> {
  let h;
  try {
    h = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch {
    throw new NotFoundError(`no base manifest at ${path}`, { path });
  }
  try {
    const st = await h.stat();
    if (!st.isFile() || st.size > MAX_MANIFEST) throw new CorruptInputError(`${path}: not a manifest file`);
    return await h.readFile();
  } finally {
    await h.close();
  }
}

export async function readManifest(path: string): Promise<BaseManifest> {
  return parseManifest(await readManifestBytes(path), path);
}
