/**
 * What the delta library reads: a target (a disk image, one RAM block of a memory snapshot)
 * as random-access bytes plus a map of where data may be. Implementations live in src/image;
 * the library itself does no I/O of its own. A name ending in Source is always a ChunkSource:
 * BufferSource (a Buffer), DiskSource (a disk image), BlockSource (a RAM block of a stream).
 */

/** A byte range [start, start + length). */
export interface Extent {
  start: number;
  length: number;
}

export interface ChunkSource {
  /** Target name: "disk", or the RAM block id ("pc.ram", "/rom@etc/acpi/tables", ...). */
  readonly name: string;
  /** Size in bytes; need not be a multiple of the chunk size. */
  readonly size: number;
  /**
   * Reads [offset, offset + length) into buf[0, length). Bytes past `size` read as zero.
   * May be called concurrently with different buffers.
   */
  read(offset: number, length: number, buf: Buffer): Promise<void>;
  /**
   * Ranges that may hold non-zero bytes, ascending and non-overlapping; every byte outside
   * them reads as zero. A source that cannot tell returns one extent covering everything.
   */
  dataExtents(): Promise<Extent[]>;
}
