/**
 * Targets: what an overlay rebuilds. A `disk` or `ram` target is chunked; a `blob` (the
 * migration stream's header, RAM-setup section and device-state tail) is opaque bytes kept
 * whole. A target has a "same place" in the base when the base has a target of the same kind
 * and name; there, a chunk with no record and the same length as the base's is unchanged.
 */
import { createHash } from 'node:crypto';
import type { ChunkMap } from './chunk-map.js';
import type { ChunkSource, Extent } from './source.js';
import { chunkLength } from './chunk.js';

export type TargetKind = 'disk' | 'ram' | 'blob';
/** The kinds cut into chunks (a blob is kept whole). */
export type ChunkedKind = Exclude<TargetKind, 'blob'>;

export interface TargetInfo {
  name: string;
  kind: TargetKind;
  size: number;
  /** Target digest (hash.ts) for chunked targets, plain sha256 for blobs; hex. */
  digest: string;
}

/** One target of the base VM as the library sees it: chunked (bytes + chunk map) or a blob. */
export type BaseTarget = BaseChunkedTarget | BaseBlobTarget;

export interface BaseChunkedTarget {
  name: string;
  kind: ChunkedKind;
  size: number;
  /** Random-access bytes. */
  source: ChunkSource;
  /** The sha256 of every non-zero chunk. */
  map: ChunkMap;
}

export interface BaseBlobTarget {
  name: string;
  kind: 'blob';
  size: number;
  blob: Buffer;
}

/** A customized target to diff: chunked (random-access bytes) or a blob. */
export type NewTarget = NewChunkedTarget | NewBlobTarget;

export interface NewChunkedTarget {
  name: string;
  kind: ChunkedKind;
  source: ChunkSource;
  /**
   * Byte ranges outside of which the target is known to equal the base at the same place
   * (e.g. a qcow2 whose backing file is the base: only its own clusters can differ). Used
   * only when the base target has the same size.
   */
  changedHint?: Extent[];
  /**
   * Chunk ranges whose content does not matter (blocks the guest's file system marks free and
   * can be trusted to: src/image/fs). They are rebuilt as whatever costs nothing: the base's
   * chunk at the same place where there is one, else zero — no record either way. The target's
   * digest is of that rebuilt content, so synthesis proves what it rebuilds. Ascending, not
   * overlapping.
   */
  dontCare?: readonly ChunkRun[];
}

/** Chunks [first, first + count). */
export interface ChunkRun {
  first: number;
  count: number;
}

export interface NewBlobTarget {
  name: string;
  kind: 'blob';
  blob: Buffer;
}

export function targetSize(t: NewTarget): number {
  return t.kind === 'blob' ? t.blob.length : t.source.size;
}

export function sameKey(a: { name: string; kind: TargetKind }, b: { name: string; kind: TargetKind }): boolean {
  return a.name === b.name && a.kind === b.kind;
}

/** Index of the base target at the same place, or -1. */
export function findSamePlace(base: readonly BaseTarget[], t: { name: string; kind: TargetKind }): number {
  return base.findIndex((b) => sameKey(b, t));
}

/** A chunk with no record keeps the base's bytes only when both have it at the same length. */
export function eligible(base: BaseTarget | undefined, size: number, index: number): boolean {
  if (!base) return false;
  const len = chunkLength(size, index);
  return len > 0 && chunkLength(base.size, index) === len;
}

/**
 * The base id: sha256 over each base target's kind, name, size and digest, and, for a base that
 * carries a VM spec, one more line with the spec's digest (docs/FORMAT.md "Base id"): a base
 * whose spec differs is another base.
 */
export function baseIdOf(targets: readonly TargetInfo[], specDigest?: string): string {
  const text =
    'cloudlet-overlay base v1\n' +
    targets.map((t) => `${t.kind}\t${t.name}\t${t.size}\t${t.digest}\n`).join('') +
    (specDigest === undefined ? '' : `vm\tspec\t0\t${specDigest}\n`);
  return createHash('sha256').update(text, 'utf8').digest('hex');
}
