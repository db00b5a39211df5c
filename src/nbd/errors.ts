/**
 * What the NBD server reports through its onError hook. The server never throws these at a
 * client's pace: a failing export read becomes EIO for that one request, a misbehaving client
 * loses its connection, and either way the owner hears about it here.
 */
import { CloudletError, type ErrorDetails } from '../util/errors.js';

/**
 * - `export`: the export's read/write/flush/blockStatus callback rejected (the client got EIO).
 * - `protocol`: a client broke the protocol (bad magic, unknown flags, oversized payload) and
 *   was disconnected.
 * - `socket`: a connection failed under us (reset, EPIPE); its pending replies were dropped.
 * - `hook`: the onRead hook threw; the read itself was served.
 */
export type NbdErrorKind = 'export' | 'protocol' | 'socket' | 'hook';

export class NbdError extends CloudletError {
  override readonly code = 'NbdError';

  constructor(
    readonly kind: NbdErrorKind,
    message: string,
    details: ErrorDetails = {},
    options?: { cause?: unknown },
  ) {
    super(message, { kind, ...details }, options);
  }
}

/** The client went away (EOF or reset) while we waited for its bytes. Internal control flow. */
export class ConnectionEnded extends Error {
  constructor(message = 'connection closed by the client') {
    super(message);
    this.name = 'ConnectionEnded';
  }
}
