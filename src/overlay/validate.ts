/**
 * Shape checks for the JSON parts of an overlay (header, index). JSON.parse gives `unknown`;
 * these turn it into typed values or a CorruptInputError that names the field.
 */
import { CorruptInputError } from '../util/errors.js';
import { CHUNK_SIZE } from '../delta/chunk.js';
import type { TargetKind } from '../delta/target.js';
import type { DiffStats } from '../delta/stats.js';
import {
  MAX_DISK_SIZE,
  MAX_SEGMENT_RAW,
  MAX_TARGETS,
  type HeaderSignature,
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
const HEX128 = /^[0-9a-f]{128}$/;
/** Longest target name (RAM block ids are at most 255 bytes in a migration stream). */
const MAX_NAME = 256;
const KINDS: readonly TargetKind[] = ['disk', 'ram', 'blob'];

function target(v: unknown, where: string): OverlayTarget {
  const o = obj(v, where);
  const kind = str(o.kind, `${where}.kind`) as TargetKind;
  if (!KINDS.includes(kind)) fail(`${where}.kind`, `unknown target kind ${kind}`);
  const digest = str(o.digest, `${where}.digest`);
  if (!HEX64.test(digest)) fail(`${where}.digest`, 'expected 64 hex digits');
  const name = str(o.name, `${where}.name`);
  if (name.length === 0 || name.length > MAX_NAME) fail(`${where}.name`, `expected 1..${MAX_NAME} characters`);
  const size = int(o.size, `${where}.size`, kind === 'disk' ? MAX_DISK_SIZE : Number.MAX_SAFE_INTEGER);
  return { name, kind, size, digest };
}

function targets(v: unknown, where: string): OverlayTarget[] {
  const list = arr(v, where);
  // Bounded before anything is built per target: a reader's cost follows the targets it keeps.
  if (list.length > MAX_TARGETS) fail(where, `${list.length} targets, at most ${MAX_TARGETS} are allowed`);
  return list.map((t, i) => target(t, `${where}[${i}]`));
}

function signature(v: unknown): HeaderSignature {
  const o = obj(v, 'header.signature');
  if (o.alg !== 'ed25519') fail('header.signature.alg', 'unsupported signature algorithm');
  const keyId = str(o.key_id, 'header.signature.key_id');
  if (!HEX64.test(keyId)) fail('header.signature.key_id', 'expected 64 hex digits');
  const sig = str(o.sig, 'header.signature.sig');
  if (!HEX128.test(sig)) fail('header.signature.sig', 'expected 128 hex digits');
  const out: HeaderSignature = { alg: 'ed25519', key_id: keyId, sig };
  if (o.signer !== undefined) {
    const signer = str(o.signer, 'header.signature.signer');
    if (signer.length > MAX_NAME) fail('header.signature.signer', 'too long');
    out.signer = signer;
  }
  return out;
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
  const list = targets(o.targets, 'header.targets');
  const names = new Set(list.map((t) => `${t.kind}:${t.name}`));
  if (names.size !== list.length) fail('header.targets', 'duplicate target');
  const baseTargets = targets(base.targets, 'header.base.targets');
  // A RAM block resumes only on the base's machine: it is one of the base's blocks, at most as
  // large. This bounds every RAM target by data the base has (readers check the listed base
  // targets against the real base: api/overlay-fit.ts).
  for (const [i, t] of list.entries()) {
    if (t.kind !== 'ram') continue;
    const b = baseTargets.find((x) => x.kind === 'ram' && x.name === t.name);
    if (!b || t.size > b.size) {
      fail(`header.targets[${i}]`, `RAM block ${JSON.stringify(t.name)} of ${t.size} bytes is not one of the base's`);
    }
  }
  const compression = obj(o.compression, 'header.compression');
  if (compression.codec !== 'zstd') fail('header.compression.codec', 'unsupported codec');
  const header: OverlayHeader = {
    format: 'cloudlet-overlay',
    version: [version[0]!, version[1]!],
    createdAt: str(o.createdAt, 'header.createdAt'),
    creator: str(o.creator, 'header.creator'),
    chunkSize,
    base: { id: baseId, targets: baseTargets },
    targets: list,
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
  if (o.index_sha256 !== undefined) {
    const h = str(o.index_sha256, 'header.index_sha256');
    if (!HEX64.test(h)) fail('header.index_sha256', 'expected 64 hex digits');
    header.index_sha256 = h;
  }
  if (o.signature !== undefined) header.signature = signature(o.signature);
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
