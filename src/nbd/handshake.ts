/**
 * The fixed newstyle handshake and option haggling, server side. Ends in transmission (after
 * NBD_OPT_GO or NBD_OPT_EXPORT_NAME), or with the client gone (NBD_OPT_ABORT, EOF). A client
 * that breaks a MUST (bad magic, unknown client flags, absurd option lengths) gets a hard
 * disconnect via NbdError('protocol'); anything merely unsupported gets an error reply and the
 * chance to try something else, as the spec asks.
 */
import type { Socket } from 'node:net';
import { NbdError } from './errors.js';
import type { NbdExport } from './export.js';
import * as P from './protocol.js';
import type { SocketReader } from './reader.js';

export interface HandshakeConfig {
  name: string;
  description: string;
  export: NbdExport;
  /** Offer structured replies (and base:allocation, if the export has blockStatus). */
  structuredReplies: boolean;
  /** True once the server is closing: options other than ABORT get NBD_REP_ERR_SHUTDOWN. */
  shuttingDown(): boolean;
}

export interface Negotiated {
  structured: boolean;
  /** Context id of base:allocation when selected, else null. */
  allocationContext: number | null;
  /** Transmission flags sent to the client. */
  flags: number;
}

/** Option payloads larger than this are refused (ERR_TOO_BIG) and the client is disconnected. */
export const MAX_OPTION_LENGTH = 64 * 1024;

const ALLOCATION_CONTEXT_ID = 1;

/** Transmission flags for this export; DF only once structured replies are on. */
export function transmissionFlags(exp: NbdExport, structured: boolean): number {
  let f = P.NBD_FLAG_HAS_FLAGS;
  if (exp.readOnly) {
    // Nothing is cached per connection: every connection sees the same bytes.
    f |= P.NBD_FLAG_READ_ONLY | P.NBD_FLAG_CAN_MULTI_CONN;
  } else {
    if (exp.write) f |= P.NBD_FLAG_SEND_FUA;
    if (exp.flush || exp.write) f |= P.NBD_FLAG_SEND_FLUSH;
    if (exp.trim) f |= P.NBD_FLAG_SEND_TRIM;
    if (exp.writeZeroes) f |= P.NBD_FLAG_SEND_WRITE_ZEROES;
  }
  if (structured) f |= P.NBD_FLAG_SEND_DF;
  return f;
}

/** A bounds-checked cursor over an option payload; any overrun marks it invalid. */
class Cursor {
  private at = 0;
  ok = true;
  constructor(private readonly buf: Buffer) {}
  u16(): number {
    if (this.at + 2 > this.buf.length) return this.bad();
    const v = this.buf.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(): number {
    if (this.at + 4 > this.buf.length) return this.bad();
    const v = this.buf.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  str(n: number): string {
    if (n > P.MAX_STRING || this.at + n > this.buf.length) {
      this.bad();
      return '';
    }
    const s = this.buf.toString('utf8', this.at, this.at + n);
    this.at += n;
    return s;
  }
  get done(): boolean {
    return this.at === this.buf.length;
  }
  private bad(): number {
    this.ok = false;
    this.at = this.buf.length;
    return 0;
  }
}

/**
 * Runs option haggling to its end. Resolves with the negotiated state on entering
 * transmission, or null after NBD_OPT_ABORT (the caller closes the socket).
 */
export async function negotiate(
  socket: Socket,
  reader: SocketReader,
  cfg: HandshakeConfig,
): Promise<Negotiated | null> {
  socket.write(P.encodeGreeting());
  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  if ((clientFlags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) !== 0) {
    throw new NbdError('protocol', `client sent unknown handshake flags 0x${clientFlags.toString(16)}`);
  }
  const noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
  let structured = false;
  let allocationSelected = false;

  const reply = (option: number, type: number, data?: Buffer): void => {
    socket.write(P.encodeOptionReply(option, type, data));
  };
  const fail = (option: number, type: number, message: string): void => {
    socket.write(P.encodeOptionError(option, type, message));
  };
  const isOurs = (name: string): boolean => name === cfg.name || name === '';

  for (;;) {
    const header = await reader.read(P.OPTION_HEADER_SIZE);
    if (header.readBigUInt64BE(0) !== P.IHAVEOPT) {
      throw new NbdError('protocol', 'option without IHAVEOPT magic');
    }
    const option = header.readUInt32BE(8);
    const length = header.readUInt32BE(12);
    if (length > MAX_OPTION_LENGTH) {
      fail(option, P.NBD_REP_ERR_TOO_BIG, `option data of ${length} bytes is over ${MAX_OPTION_LENGTH}`);
      throw new NbdError('protocol', `option ${option} with ${length} bytes of data`, { option, length });
    }
    const data = length > 0 ? await reader.read(length) : Buffer.alloc(0);

    if (option === P.NBD_OPT_ABORT) {
      reply(option, P.NBD_REP_ACK);
      return null;
    }
    if (cfg.shuttingDown()) {
      if (option === P.NBD_OPT_EXPORT_NAME) throw new NbdError('protocol', 'export requested during shutdown');
      fail(option, P.NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
      continue;
    }

    switch (option) {
      case P.NBD_OPT_EXPORT_NAME: {
        // No way to report an error here: an unknown name means a hard disconnect (spec).
        const name = data.toString('utf8');
        if (!isOurs(name)) throw new NbdError('protocol', `NBD_OPT_EXPORT_NAME for unknown export "${name}"`);
        const flags = transmissionFlags(cfg.export, structured);
        socket.write(P.encodeExportNameReply(cfg.export.size, flags, noZeroes));
        return { structured, allocationContext: allocationSelected ? ALLOCATION_CONTEXT_ID : null, flags };
      }
      case P.NBD_OPT_LIST:
        if (length !== 0) {
          fail(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
          break;
        }
        reply(option, P.NBD_REP_SERVER, P.encodeServerEntry(cfg.name, cfg.description));
        reply(option, P.NBD_REP_ACK);
        break;
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO: {
        const c = new Cursor(data);
        const name = c.str(c.u32());
        const infos: number[] = [];
        for (let n = c.u16(); n > 0 && c.ok; n--) infos.push(c.u16());
        if (!c.ok || !c.done) {
          fail(option, P.NBD_REP_ERR_INVALID, 'malformed NBD_OPT_INFO/GO data');
          break;
        }
        if (!isOurs(name)) {
          fail(option, P.NBD_REP_ERR_UNKNOWN, `no export named "${name}" (this server has "${cfg.name}")`);
          break;
        }
        const flags = transmissionFlags(cfg.export, structured);
        reply(option, P.NBD_REP_INFO, P.encodeInfoExport(cfg.export.size, flags));
        // Block sizes always: they are the defaults, so telling a client that did not ask is harmless.
        reply(option, P.NBD_REP_INFO, P.encodeInfoBlockSize());
        if (infos.includes(P.NBD_INFO_NAME)) {
          reply(option, P.NBD_REP_INFO, P.encodeInfoString(P.NBD_INFO_NAME, cfg.name));
        }
        if (infos.includes(P.NBD_INFO_DESCRIPTION) && cfg.description) {
          reply(option, P.NBD_REP_INFO, P.encodeInfoString(P.NBD_INFO_DESCRIPTION, cfg.description));
        }
        reply(option, P.NBD_REP_ACK);
        if (option === P.NBD_OPT_GO) {
          return { structured, allocationContext: allocationSelected ? ALLOCATION_CONTEXT_ID : null, flags };
        }
        break;
      }
      case P.NBD_OPT_STRUCTURED_REPLY:
        if (!cfg.structuredReplies) fail(option, P.NBD_REP_ERR_UNSUP, 'structured replies are turned off');
        else if (length !== 0) fail(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        else if (structured) fail(option, P.NBD_REP_ERR_INVALID, 'structured replies already negotiated');
        else {
          structured = true;
          reply(option, P.NBD_REP_ACK);
        }
        break;
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT: {
        const set = option === P.NBD_OPT_SET_META_CONTEXT;
        if (set) allocationSelected = false; // SET replaces the selection, even when it fails
        if (!cfg.structuredReplies) {
          fail(option, P.NBD_REP_ERR_UNSUP, 'metadata contexts need structured replies, which are off');
          break;
        }
        if (!structured) {
          fail(option, P.NBD_REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first');
          break;
        }
        const c = new Cursor(data);
        const name = c.str(c.u32());
        const queries: string[] = [];
        for (let n = c.u32(); n > 0 && c.ok; n--) queries.push(c.str(c.u32()));
        if (!c.ok || !c.done) {
          fail(option, P.NBD_REP_ERR_INVALID, 'malformed meta context request');
          break;
        }
        if (!isOurs(name)) {
          fail(option, P.NBD_REP_ERR_UNKNOWN, `no export named "${name}"`);
          break;
        }
        const offered = cfg.export.blockStatus !== undefined;
        // SET selects exact names only; LIST also answers the "base:" wildcard and an empty query list.
        const match = set
          ? queries.includes(P.BASE_ALLOCATION)
          : queries.length === 0 || queries.some((q) => q === 'base:' || q === P.BASE_ALLOCATION);
        if (offered && match) {
          const id = set ? ALLOCATION_CONTEXT_ID : 0; // LIST: ids are reserved, send zero
          reply(option, P.NBD_REP_META_CONTEXT, P.encodeMetaContext(id, P.BASE_ALLOCATION));
          if (set) allocationSelected = true;
        }
        reply(option, P.NBD_REP_ACK);
        break;
      }
      case P.NBD_OPT_STARTTLS:
        fail(option, P.NBD_REP_ERR_POLICY, 'TLS is not offered (local unix socket)');
        break;
      default:
        fail(option, P.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }
}
