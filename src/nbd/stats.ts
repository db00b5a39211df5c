/**
 * Counters an NbdServer keeps for benchmarks and logs. Plain numbers, updated in place; read
 * them through NbdServer.stats (a snapshot).
 */
export interface NbdStats {
  /** Connections accepted so far (including refused and failed handshakes). */
  connections: number;
  /** Connections open now. */
  activeConnections: number;
  /** Transmission-phase requests received, of every type. */
  requests: number;
  /** READ requests answered with data, and their bytes. */
  reads: number;
  bytesRead: number;
  /** WRITE requests that succeeded, and their bytes. */
  writes: number;
  bytesWritten: number;
  /** Requests answered with an error (EINVAL, EPERM, EIO, ESHUTDOWN, ...). */
  errorReplies: number;
  /** Most requests, and most payload bytes, admitted at once on one connection. */
  peakInflight: number;
  peakInflightBytes: number;
}

export function emptyStats(): NbdStats {
  return {
    connections: 0,
    activeConnections: 0,
    requests: 0,
    reads: 0,
    bytesRead: 0,
    writes: 0,
    bytesWritten: 0,
    errorReplies: 0,
    peakInflight: 0,
    peakInflightBytes: 0,
  };
}
