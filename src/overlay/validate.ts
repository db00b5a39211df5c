/**
 * Shape checks for the JSON parts of an overlay (header, index). JSON.parse gives `unknown`;
 * these turn it into typed values or a CorruptInputError that names the field.
 */
import { CorruptInputError } from '../util/errors.js';
import { CHUNK_SIZE } from '../delta/chunk.js';
import type { TargetKind } from '../delta/target.js';
import type { DiffStats } from '../delta/stats.js';
import {
  MAX_SEGMENT_RAW,
  type OverlayHeader,
  type OverlayIndex,
  type OverlayTarget,
  type SegmentEntry,
} from './format.js';

type Obj = { [key: string]: unknown };

function fail(where: string, what: string): never {
  throw new CorruptInputError(`${where}: ${what}`);
}

function obj(v: unknown, where: string): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(where, 'expected an object');
  return v as Obj;
}

function str(v: unknown, where: string): string {
  if (typeof v !== 'string') fail(where, 'expected a string');
  return v;
}

function int(v: unknown, where: string, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v > max)
    fail(where, 'expected a non-negative integer');
  return v;
}

function arr(v: unknown, where: string): unknown[] {
  if (!Array.isArray(v)) fail(where, 'expected an array');
  return v;
}

const HEX64 = /^[0-9a-f]{64}$/;
const KINDS: readonly TargetKind[] = ['disk', 'ram', 'blob'];

function target(v: unknown, where: string): OverlayTarget {
  const o = obj(v, where);
  const kind = str(o.kind, `${where}.kind`) as TargetKind;
  if (!KINDS.includes(kind)) fail(`${where}.kind`, `unknown target kind ${kind}`);
  const digest = str(o.digest, `${where}.digest`);
  if (!HEX64.test(digest)) fail(`${where}.digest`, 'expected 64 hex digits');
  return { name: str(o.name, `${where}.name`), kind, size: int(o.size, `${where}.size`), digest };
}

function parseJson(buf: Buffer, where: string): unknown {
  try {
    return JSON.parse(buf.toString('utf8'));
  } catch {
    fail(where, 'not valid JSON');
  }
}

export function parseHeader(buf: Buffer): OverlayHeader {
  const o = obj(parseJson(buf, 'header'), 'header');
  if (o.format !== 'cloudlet-overlay') fail('header.format', 'not a cloudlet-overlay header');
  const version = arr(o.version, 'header.version').map((x, i) => int(x, `header.version[${i}]`));
  if (version.length !== 2) fail('header.version', 'expected [major, minor]');
  const chunkSize = int(o.chunkSize, 'header.chunkSize');
  if (chunkSize !== CHUNK_SIZE) fail('header.chunkSize', `unsupported chunk size ${chunkSize}`);
  const base = obj(o.base, 'header.base');
  const baseId = str(base.id, 'header.base.id');
  if (!HEX64.test(baseId)) fail('header.base.id', 'expected 64 hex digits');
  const targets = arr(o.targets, 'header.targets').map((t, i) => target(t, `header.targets[${i}]`));
  const names = new Set(targets.map((t) => `${t.kind}:${t.name}`));
  if (names.size !== targets.length) fail('header.targets', 'duplicate target');
  const compression = obj(o.compression, 'header.compression');
  if (compression.codec !== 'zstd') fail('header.compression.codec', 'unsupported codec');
  const header: OverlayHeader = {
    format: 'cloudlet-overlay',
    version: [version[0]!, version[1]!],
    createdAt: str(o.createdAt, 'header.createdAt'),
    creator: str(o.creator, 'header.creator'),
    chunkSize,
    base: {
      id: baseId,
      targets: arr(base.targets, 'header.base.targets').map((t, i) => target(t, `header.base.targets[${i}]`)),
    },
    targets,
    compression: { codec: 'zstd', level: int(compression.level, 'header.compression.level', 22) },
  };
  if (o.memory !== undefined) {
    const m = obj(o.memory, 'header.memory');
    header.memory = {
      machine: str(m.machine, 'header.memory.machine'),
      mainBlock: str(m.mainBlock, 'header.memory.mainBlock'),
      ramSectionId: int(m.ramSectionId, 'header.memory.ramSectionId', 0xffffffff),
    };
  }
  return header;
}

export function parseIndex(buf: Buffer): OverlayIndex {
  const o = obj(parseJson(buf, 'index'), 'index');
  const segments: SegmentEntry[] = arr(o.segments, 'index.segments').map((v, i) => {
    const w = `index.segments[${i}]`;
    const s = obj(v, w);
    const sha = str(s.sha256, `${w}.sha256`);
    if (!HEX64.test(sha)) fail(`${w}.sha256`, 'expected 64 hex digits');
    return {
      offset: int(s.offset, `${w}.offset`),
      length: int(s.length, `${w}.length`, 0xffffffff),
      rawLength: int(s.rawLength, `${w}.rawLength`, MAX_SEGMENT_RAW),
      records: int(s.records, `${w}.records`, 0xffffffff),
      sha256: sha,
      covers: arr(s.covers, `${w}.covers`).map((c, j) => {
        const t = arr(c, `${w}.covers[${j}]`).map((x) => int(x, `${w}.covers[${j}]`));
        if (t.length !== 3) fail(`${w}.covers[${j}]`, 'expected [target, first, end]');
        return [t[0]!, t[1]!, t[2]!] as [number, number, number];
      }),
    };
  });
  const stats = obj(o.stats ?? {}, 'index.stats') as unknown as DiffStats;
  return { segments, stats };
}
