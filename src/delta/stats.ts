/** Counters of what a diff produced, per encoding and per target; plain JSON. */
import { encodingNames, type Encoding } from './record.js';

export interface EncodingStats {
  records: number;
  chunks: number;
  /** Payload bytes before segment compression. */
  bytes: number;
}

export interface TargetStats {
  kind: string;
  size: number;
  /** Chunks that hold data in the customized target. */
  dataChunks: number;
  /** Chunks that differ from the base at the same place (and need a record). */
  changedChunks: number;
  /**
   * Chunks that would have been read and compared, left out because their content does not
   * matter (NewChunkedTarget.dontCare: free blocks); present only when the target had such ranges.
   */
  dontCareChunks?: number;
}

export interface DiffStats {
  encodings: { [name: string]: EncodingStats };
  targets: { [name: string]: TargetStats };
  /** Bytes of customized and base data read. */
  bytesRead: number;
}

export function emptyStats(): DiffStats {
  return { encodings: {}, targets: {}, bytesRead: 0 };
}

export function countRecord(stats: DiffStats, enc: Encoding, chunks: number, bytes: number, newRecord: boolean): void {
  const name = encodingNames[enc];
  const e = (stats.encodings[name] ??= { records: 0, chunks: 0, bytes: 0 });
  if (newRecord) e.records++;
  e.chunks += chunks;
  e.bytes += bytes;
}
