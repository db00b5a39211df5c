/**
 * The blob targets of a memory snapshot: the migration stream's prefix (header and
 * configuration), its ram START section (the block list) and its device-state tail. Kept whole
 * (never chunked); together with the RAM blocks they rebuild the stream exactly.
 */
export const BLOB_PREFIX = 'stream.prefix';
export const BLOB_START = 'stream.start';
export const BLOB_TAIL = 'stream.tail';

/** The blob names in target order: a decoder has the stream header before any page. */
export const STREAM_BLOBS = [BLOB_PREFIX, BLOB_START, BLOB_TAIL] as const;
export type StreamBlob = (typeof STREAM_BLOBS)[number];
