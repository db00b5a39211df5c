/**
 * DiskWriter: what the overlay decoder writes a synthesized disk through. Chunks arrive in
 * ascending offset order, which lets the writers stream: a qcow2 writer completes each cluster
 * once, a raw writer copies each base range once. Implementations: Qcow2Writer, RawWriter (on
 * the shared OrderedWriter). They are fed in pages (util/page.ts); the last chunk of a disk may
 * be shorter.
 */
import { PAGE_SIZE } from '../../util/page.js';
import { CloudletError } from '../../util/errors.js';

export interface DiskWriter {
  readonly path: string;
  readonly format: 'qcow2' | 'raw';
  readonly virtualSize: number;
  /**
   * Sets [offset, offset + data.length). `offset` is a multiple of PAGE_SIZE, at or after the
   * end of the previous writeChunk/zeroChunk; the length is a multiple of PAGE_SIZE unless the
   * range ends at virtualSize.
   */
  writeChunk(offset: number, data: Uint8Array): Promise<void>;
  /** Like writeChunk with zeros; `length` defaults to one chunk (clipped to virtualSize). */
  zeroChunk(offset: number, length?: number): Promise<void>;
  /**
   * The output's current bytes at [offset, offset + length): what was written or zeroed, the
   * base elsewhere, zero past virtualSize. Into `buf` when given (its first `length` bytes).
   */
  readBack(offset: number, length: number, buf?: Buffer): Promise<Buffer>;
  /** Completes the image, fsyncs it and renames it into place. */
  finish(): Promise<WriterStats>;
  /** Removes the partial output; nothing appears at `path`. Safe to call more than once. */
  abort(): Promise<void>;
}

export interface WriterStats {
  path: string;
  format: 'qcow2' | 'raw';
  virtual_size: number;
  /** Length of the output file (a sparse file may occupy less). */
  file_size: number;
  /** Bytes the caller wrote / zeroed. */
  written_bytes: number;
  zeroed_bytes: number;
  /** qcow2: clusters holding data, clusters stored as zero flags, L2 tables. */
  data_clusters?: number;
  zero_clusters?: number;
  l2_tables?: number;
}

/**
 * Checks one writeChunk/zeroChunk call against the ordering and alignment contract; returns
 * the end offset. Violations are bugs in the caller: CloudletError (internal).
 */
export function checkChunkRange(offset: number, length: number, virtualSize: number, nextOffset: number): number {
  const end = offset + length;
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || length <= 0 || offset % PAGE_SIZE !== 0) {
    throw new CloudletError(`disk write at ${offset} (+${length}): not a positive, ${PAGE_SIZE}-aligned range`);
  }
  if (end > virtualSize) {
    throw new CloudletError(`disk write at ${offset} (+${length}) past the virtual size ${virtualSize}`);
  }
  if (length % PAGE_SIZE !== 0 && end !== virtualSize) {
    throw new CloudletError(`disk write at ${offset}: a short chunk (${length} bytes) must end the disk`);
  }
  if (offset < nextOffset) {
    throw new CloudletError(`disk write at ${offset} is out of order (next expected offset ≥ ${nextOffset})`);
  }
  return end;
}

/** A writer refuses every call after it finished, aborted or failed. */
export function checkUsable(state: 'open' | 'finished' | 'aborted' | 'failed', path: string): void {
  if (state !== 'open') throw new CloudletError(`disk writer for ${path} is ${state}`);
}
