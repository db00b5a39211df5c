/**
 * The NBD server module: serve one export (size + async read callback) to QEMU over a unix
 * socket. See docs/nbd.md.
 */
export { NbdServer, nbdBlockdev, nbdUnixUri, type NbdServerOptions } from './server.js';
export { allocationStatus, chunkSourceExport, type NbdExport, type NbdExtent } from './export.js';
export { NbdError, type NbdErrorKind } from './errors.js';
export type { NbdStats } from './stats.js';
export { NBD_STATE_HOLE, NBD_STATE_ZERO } from './protocol.js';
