/**
 * A typed wrapper over the real `qemu-img` binary (qemu-utils). Every call names the image
 * format with `-f` once it is known, so qemu never probes a raw image in a write path (a raw
 * image whose first bytes look like a qcow2 header would otherwise be opened as qcow2).
 *
 * The binary is `qemu-img` from PATH, or `$QEMU_IMG` when set (custom builds, tests), found
 * like every other program (util/programs.ts).
 * Failures: a missing binary → MissingToolError naming the Debian package; any other failure →
 * QemuError carrying the subcommand, exit code and the end of stderr.
 */
import { isAbsolute } from 'node:path';
import { QemuError, UnsupportedError } from '../../util/errors.js';
import { findTool, missingTool } from '../../util/programs.js';

/** How many characters of stderr an error keeps: the end is where qemu-img says why. */
const STDERR_TAIL = 2000;

export interface ImageInfo {
  filename: string;
  format: string;
  virtualSize: number;
  actualSize?: number;
  clusterSize?: number;
  /** The backing file name as stored in the image. */
  backingFilename?: string;
  /** The backing file name resolved the way qemu opens it (relative to the image's directory). */
  fullBackingFilename?: string;
  backingFormat?: string;
  encrypted: boolean;
  dirty: boolean;
  /** qcow2 only: the external data file, when the image keeps its guest data elsewhere. */
  dataFile?: string;
  /** qcow2 only: "zlib" or "zstd". */
  compressionType?: string;
}

/** One extent of `qemu-img map --output=json`. */
export interface MapEntry {
  start: number;
  length: number;
  /** Index into the backing chain (0 = the image itself) of the layer that defines the range. */
  depth: number;
  /** False when no layer of the chain defines the range (it reads as zero). */
  present: boolean;
  /** The range reads as zero. */
  zero: boolean;
  /** The range is allocated as data in the layer at `depth`. */
  data: boolean;
  /** Byte offset of the data inside that layer's file, when the data is stored plainly there. */
  offset?: number;
  compressed?: boolean;
}

export interface CheckResult {
  /** Inconsistencies that make the image unsafe to use. */
  corruptions: number;
  /** Clusters with a refcount but no reference: wasted space, harmless. */
  leaks: number;
  /** Errors that stopped the check from looking at part of the image. */
  checkErrors: number;
  imageEndOffset?: number;
  allocatedClusters?: number;
  totalClusters?: number;
  /** What qemu-img wrote to stderr (one entry per line), e.g. "ERROR OFLAG_COPIED ...". */
  messages: string[];
}

export interface ReadOptions {
  /** Skip the format probe; always pass it when the format is known. */
  format?: string;
  /** `-U`: read an image another process holds open for writing (results may be inconsistent). */
  forceShare?: boolean;
}

export interface ConvertOptions {
  srcFormat: string;
  dstFormat: string;
  /** `-c`: compress the output (qcow2). */
  compress?: boolean;
  /** `-o key=value,...`, e.g. { cluster_size: 65536, compression_type: 'zstd' }. */
  options?: Record<string, string | number | boolean>;
  /** `-B`: the output gets this backing file (it does not diff against it: see `rebase`). */
  backingFile?: string;
  backingFormat?: string;
  /** False → `-S 0`: write every byte, no holes. Default: qemu-img's 4 KiB zero detection. */
  sparse?: boolean;
}

export interface CreateOptions {
  format: string;
  /** Virtual size in bytes; may be omitted when a backing file gives it. */
  size?: number;
  backingFile?: string;
  backingFormat?: string;
  options?: Record<string, string | number | boolean>;
}

export interface RebaseOptions {
  format: string;
  /** New backing file; "" removes the backing file (the image becomes standalone). */
  backingFile: string;
  backingFormat?: string;
  /** `-u`: only rewrite the header, without comparing data (the caller guarantees equality). */
  unsafe?: boolean;
}

export interface CompareOptions {
  formatA: string;
  formatB: string;
  /** `-s`: images of different size, or allocated vs zero, count as different. */
  strict?: boolean;
}

interface RunResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** `qemu-img info`; with backingChain the whole chain, the image itself first. */
export function info(path: string, opts: ReadOptions & { backingChain: true }): Promise<ImageInfo[]>;
export function info(path: string, opts?: ReadOptions & { backingChain?: false }): Promise<ImageInfo>;
export async function info(
  path: string,
  opts: ReadOptions & { backingChain?: boolean } = {},
): Promise<ImageInfo | ImageInfo[]> {
  const args = ['info', '--output=json', ...readFlags(opts)];
  if (opts.backingChain) args.push('--backing-chain');
  args.push(safePath(path));
  const { stdout } = await run(args);
  const parsed = parseJson(stdout, 'info');
  if (opts.backingChain) {
    if (!Array.isArray(parsed)) throw badOutput('info', 'expected a JSON array');
    return parsed.map((v: unknown) => toImageInfo(v));
  }
  return toImageInfo(parsed);
}

/** `qemu-img map --output=json`: how each range of the virtual disk is stored, chain included. */
export async function map(path: string, format: string, opts: Omit<ReadOptions, 'format'> = {}): Promise<MapEntry[]> {
  const args = ['map', '--output=json', ...readFlags({ ...opts, format }), safePath(path)];
  const { stdout } = await run(args);
  const parsed = parseJson(stdout, 'map');
  if (!Array.isArray(parsed)) throw badOutput('map', 'expected a JSON array');
  return parsed.map((v: unknown) => toMapEntry(v));
}

export async function convert(src: string, dst: string, opts: ConvertOptions): Promise<void> {
  const args = ['convert', '-f', opts.srcFormat, '-O', opts.dstFormat];
  if (opts.compress) args.push('-c');
  if (opts.sparse === false) args.push('-S', '0');
  if (opts.backingFile !== undefined) {
    args.push('-B', opts.backingFile, '-F', requireBackingFormat(opts.backingFormat));
  }
  const o = optionString(opts.options);
  if (o) args.push('-o', o);
  args.push(safePath(src), safePath(dst));
  await run(args);
}

export async function create(path: string, opts: CreateOptions): Promise<void> {
  const args = ['create', '-q', '-f', opts.format];
  if (opts.backingFile !== undefined) {
    args.push('-b', opts.backingFile, '-F', requireBackingFormat(opts.backingFormat));
  }
  const o = optionString(opts.options);
  if (o) args.push('-o', o);
  args.push(safePath(path));
  if (opts.size !== undefined) args.push(String(opts.size));
  await run(args);
}

/**
 * `qemu-img check --output=json`. Exit 0 (clean), 2 (corruptions) and 3 (leaks) all return a
 * result; a format without checks (raw) → UnsupportedError; anything else → QemuError.
 */
export async function check(path: string, format: string): Promise<CheckResult> {
  const args = ['check', '--output=json', '-f', format, safePath(path)];
  const r = await run(args, [0, 2, 3, 63]);
  if (r.exitCode === 63) {
    throw new UnsupportedError(`qemu-img cannot check ${format} images`, { path, format });
  }
  const parsed = parseJson(r.stdout, 'check');
  const o = asObject(parsed, 'check');
  return {
    corruptions: optNumber(o, 'corruptions') ?? 0,
    leaks: optNumber(o, 'leaks') ?? 0,
    checkErrors: optNumber(o, 'check-errors') ?? 0,
    imageEndOffset: optNumber(o, 'image-end-offset'),
    allocatedClusters: optNumber(o, 'allocated-clusters'),
    totalClusters: optNumber(o, 'total-clusters'),
    messages: r.stderr.split('\n').filter((l) => l.trim() !== ''),
  };
}

/** `qemu-img compare`: true when the guest-visible contents are identical. */
export async function compare(a: string, b: string, opts: CompareOptions): Promise<boolean> {
  const args = ['compare', '-q', '-f', opts.formatA, '-F', opts.formatB];
  if (opts.strict) args.push('-s');
  args.push(safePath(a), safePath(b));
  const r = await run(args, [0, 1]);
  return r.exitCode === 0;
}

/**
 * `qemu-img rebase`. Safe mode reads the whole image and both backing files (cost ∝ disk size);
 * `unsafe` only rewrites the header.
 */
export async function rebase(path: string, opts: RebaseOptions): Promise<void> {
  const args = ['rebase', '-q', '-f', opts.format];
  if (opts.unsafe) args.push('-u');
  args.push('-b', opts.backingFile);
  if (opts.backingFile !== '') args.push('-F', requireBackingFormat(opts.backingFormat));
  args.push(safePath(path));
  await run(args);
}

async function run(args: string[], okExitCodes: number[] = [0]): Promise<RunResult> {
  const bin = await findTool('qemu-img');
  // Loaded on first use: execa costs ~80 ms of start-up that most commands never need.
  const { execa } = await import('execa');
  const r = await execa(bin, args, { reject: false, stdin: 'ignore', env: { LC_ALL: 'C' } });
  const command = `qemu-img ${args[0] ?? ''}`;
  if (r.exitCode === undefined) {
    if (r.code === 'ENOENT') throw missingTool('qemu-img', bin);
    throw new QemuError(`${command} could not run: ${r.shortMessage}`, { command, args }, { cause: r });
  }
  if (!okExitCodes.includes(r.exitCode)) {
    const tail = stderrTail(r.stderr);
    throw new QemuError(`${command} failed (exit ${r.exitCode}): ${lastLine(tail)}`, {
      command,
      args,
      exit_code: r.exitCode,
      stderr: tail,
    });
  }
  return { exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr };
}

function readFlags(opts: ReadOptions): string[] {
  const f: string[] = [];
  if (opts.format !== undefined) f.push('-f', opts.format);
  if (opts.forceShare) f.push('-U');
  return f;
}

/**
 * qemu-img reads "x:y" as protocol x and "-x" as an option; "./" in front of a relative path
 * makes it a plain file name either way.
 */
function safePath(p: string): string {
  if (isAbsolute(p) || p.startsWith('./') || p.startsWith('../')) return p;
  return `./${p}`;
}

function requireBackingFormat(fmt: string | undefined): string {
  if (fmt === undefined) {
    throw new UnsupportedError('a backing file needs an explicit backing format (no probing)');
  }
  return fmt;
}

function optionString(options: Record<string, string | number | boolean> | undefined): string {
  if (!options) return '';
  return Object.entries(options)
    .map(([k, v]) => `${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v).replaceAll(',', ',,')}`)
    .join(',');
}

function stderrTail(stderr: string): string {
  const s = stderr.trimEnd();
  return s.length > STDERR_TAIL ? s.slice(s.length - STDERR_TAIL) : s;
}

function lastLine(s: string): string {
  const lines = s.split('\n').filter((l) => l.trim() !== '');
  return lines[lines.length - 1]?.replace(/^qemu-img: /, '') ?? '(no message)';
}

function parseJson(text: string, what: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new QemuError(`qemu-img ${what} printed invalid JSON`, { command: `qemu-img ${what}` }, { cause: err });
  }
}

function badOutput(what: string, why: string): QemuError {
  return new QemuError(`unexpected qemu-img ${what} output: ${why}`, { command: `qemu-img ${what}` });
}

function asObject(v: unknown, what: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw badOutput(what, 'expected a JSON object');
  return v as Record<string, unknown>;
}

function optNumber(o: Record<string, unknown>, key: string): number | undefined {
  const v = o[key];
  return typeof v === 'number' ? v : undefined;
}

function optString(o: Record<string, unknown>, key: string): string | undefined {
  const v = o[key];
  return typeof v === 'string' ? v : undefined;
}

function optBool(o: Record<string, unknown>, key: string): boolean | undefined {
  const v = o[key];
  return typeof v === 'boolean' ? v : undefined;
}

function reqNumber(o: Record<string, unknown>, key: string, what: string): number {
  const v = optNumber(o, key);
  if (v === undefined) throw badOutput(what, `missing number "${key}"`);
  return v;
}

function toImageInfo(v: unknown): ImageInfo {
  const o = asObject(v, 'info');
  const filename = optString(o, 'filename');
  const format = optString(o, 'format');
  if (filename === undefined || format === undefined) throw badOutput('info', 'missing filename/format');
  const result: ImageInfo = {
    filename,
    format,
    virtualSize: reqNumber(o, 'virtual-size', 'info'),
    encrypted: optBool(o, 'encrypted') ?? false,
    dirty: optBool(o, 'dirty-flag') ?? false,
  };
  const actualSize = optNumber(o, 'actual-size');
  if (actualSize !== undefined) result.actualSize = actualSize;
  const clusterSize = optNumber(o, 'cluster-size');
  if (clusterSize !== undefined) result.clusterSize = clusterSize;
  const backing = optString(o, 'backing-filename');
  if (backing !== undefined) result.backingFilename = backing;
  const fullBacking = optString(o, 'full-backing-filename');
  if (fullBacking !== undefined) result.fullBackingFilename = fullBacking;
  const backingFormat = optString(o, 'backing-filename-format');
  if (backingFormat !== undefined) result.backingFormat = backingFormat;
  const fs = o['format-specific'];
  if (typeof fs === 'object' && fs !== null && !Array.isArray(fs)) {
    const data = (fs as Record<string, unknown>)['data'];
    if (typeof data === 'object' && data !== null && !Array.isArray(data)) {
      const d = data as Record<string, unknown>;
      const dataFile = optString(d, 'data-file');
      if (dataFile !== undefined) result.dataFile = dataFile;
      const ct = optString(d, 'compression-type');
      if (ct !== undefined) result.compressionType = ct;
    }
  }
  return result;
}

function toMapEntry(v: unknown): MapEntry {
  const o = asObject(v, 'map');
  const e: MapEntry = {
    start: reqNumber(o, 'start', 'map'),
    length: reqNumber(o, 'length', 'map'),
    depth: optNumber(o, 'depth') ?? 0,
    present: optBool(o, 'present') ?? true,
    zero: optBool(o, 'zero') ?? false,
    data: optBool(o, 'data') ?? false,
  };
  const offset = optNumber(o, 'offset');
  if (offset !== undefined) e.offset = offset;
  const compressed = optBool(o, 'compressed');
  if (compressed !== undefined) e.compressed = compressed;
  return e;
}
