/**
 * The NBD server against a raw-socket client written from the spec: handshake and options byte
 * by byte, transmission replies and error codes, and hostile clients (bad magic, absurd
 * lengths, floods, disconnects mid-reply) — the server must stay up, bounded and serving.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { link, mkdtemp, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';
import { allocationStatus, type NbdExport } from '../../src/nbd/export.js';
import { clipExtents } from '../../src/nbd/connection.js';
import type { NbdError } from '../../src/nbd/errors.js';
import * as P from '../../src/nbd/protocol.js';
import { BusyError } from '../../src/util/errors.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const unhandled: unknown[] = [];
process.on('unhandledRejection', (e) => unhandled.push(e));

/** Byte at offset o: its 4 KiB block number mod 251 (cheap to fill, differs block to block). */
function fillPattern(offset: number, buf: Buffer): void {
  let pos = 0;
  while (pos < buf.length) {
    const o = offset + pos;
    const blockEnd = Math.min(buf.length, pos + (4096 - (o % 4096)));
    buf.fill(Math.floor(o / 4096) % 251, pos, blockEnd);
    pos = blockEnd;
  }
}

function expected(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  fillPattern(offset, b);
  return b;
}

interface PatternOptions {
  size?: number;
  /** Milliseconds to wait before answering this read. */
  delay?: (offset: number, length: number) => number;
  /** Reject this read. */
  fail?: (offset: number, length: number) => boolean;
}

function patternExport(o: PatternOptions = {}): NbdExport & { reads: Array<[number, number]> } {
  const reads: Array<[number, number]> = [];
  return {
    size: o.size ?? 64 * MiB,
    readOnly: true,
    reads,
    async read(offset, length, buf) {
      reads.push([offset, length]);
      const ms = o.delay?.(offset, length) ?? 0;
      if (ms > 0) await sleep(ms);
      if (o.fail?.(offset, length)) throw new Error(`injected failure at ${offset}`);
      fillPattern(offset, buf);
    },
    async blockStatus(offset, length) {
      // First 1 MiB data, the rest a hole.
      return allocationStatus([{ start: 0, length: MiB }], offset, length);
    },
  };
}

/** A minimal NBD client over a raw socket: exact reads with timeouts, spec-shaped messages. */
class Raw {
  private chunks: Buffer[] = [];
  private total = 0;
  private wake: (() => void) | null = null;
  closed = false;
  private cookieSeq = 1n;

  private constructor(readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.total += d.length;
      this.wake?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
    socket.on('error', () => undefined);
  }

  /** A unix socket path, or a TCP port on 127.0.0.1. */
  static connect(where: string | number): Promise<Raw> {
    return new Promise((resolve, reject) => {
      const s = typeof where === 'number' ? connect(where, '127.0.0.1') : connect(where);
      s.once('connect', () => resolve(new Raw(s)));
      s.once('error', reject);
    });
  }

  get buffered(): number {
    return this.total;
  }

  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.total < n) {
      if (this.closed) throw new Error(`connection closed with ${this.total}/${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.total})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = null;
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    this.chunks = all.length > n ? [all.subarray(n)] : [];
    this.total -= n;
    return out;
  }

  /** True once the server has closed the connection (within the timeout). */
  async closedWithin(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) await sleep(10);
    return this.closed;
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  destroy(): void {
    this.socket.destroy();
  }

  async greet(clientFlags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Promise<number> {
    const g = await this.read(18);
    assert.equal(g.readBigUInt64BE(0), P.NBDMAGIC);
    assert.equal(g.readBigUInt64BE(8), P.IHAVEOPT);
    const u = Buffer.alloc(4);
    u.writeUInt32BE(clientFlags);
    this.write(u);
    return g.readUInt16BE(16);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), lengthOverride?: number): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(P.IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(lengthOverride ?? data.length, 12);
    this.write(Buffer.concat([h, data]));
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readBigUInt64BE(0), P.NBD_REP_MAGIC);
    const length = h.readUInt32BE(16);
    const data = length ? Buffer.from(await this.read(length)) : Buffer.alloc(0);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  }

  /** Sends INFO or GO; returns every reply up to the final one. */
  async infoOrGo(option: number, name: string, infos: number[] = []): Promise<Array<{ type: number; data: Buffer }>> {
    const n = Buffer.from(name);
    const d = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
    d.writeUInt32BE(n.length, 0);
    n.copy(d, 4);
    d.writeUInt16BE(infos.length, 4 + n.length);
    infos.forEach((t, i) => d.writeUInt16BE(t, 6 + n.length + 2 * i));
    this.sendOption(option, d);
    const replies: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const r = await this.optionReply();
      assert.equal(r.option, option);
      replies.push(r);
      if (r.type !== P.NBD_REP_INFO) return replies;
    }
  }

  async metaContext(option: number, name: string, queries: string[]): Promise<Array<{ type: number; data: Buffer }>> {
    const parts: Buffer[] = [];
    const u32 = (v: number): Buffer => {
      const b = Buffer.alloc(4);
      b.writeUInt32BE(v);
      return b;
    };
    parts.push(u32(Buffer.byteLength(name)), Buffer.from(name), u32(queries.length));
    for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
    this.sendOption(option, Buffer.concat(parts));
    const replies: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const r = await this.optionReply();
      replies.push(r);
      if (r.type !== P.NBD_REP_META_CONTEXT) return replies;
    }
  }

  /** Greets, optionally negotiates structured replies + base:allocation, and GOes. */
  async open(name: string, o: { structured?: boolean; allocation?: boolean } = {}): Promise<{ flags: number }> {
    await this.greet();
    if (o.structured) {
      this.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
      assert.equal((await this.optionReply()).type, P.NBD_REP_ACK);
      if (o.allocation) {
        const r = await this.metaContext(P.NBD_OPT_SET_META_CONTEXT, name, [P.BASE_ALLOCATION]);
        assert.equal(r.length, 2);
      }
    }
    const replies = await this.infoOrGo(P.NBD_OPT_GO, name, [P.NBD_INFO_BLOCK_SIZE]);
    assert.equal(replies.at(-1)!.type, P.NBD_REP_ACK);
    const info = replies.find((r) => r.data.readUInt16BE(0) === P.NBD_INFO_EXPORT)!;
    return { flags: info.data.readUInt16BE(10) };
  }

  nextCookie(): Buffer {
    const c = Buffer.alloc(8);
    c.writeBigUInt64BE(this.cookieSeq++);
    return c;
  }

  request(
    type: number,
    offset: number,
    length: number,
    o: { flags?: number; cookie?: Buffer; payload?: Buffer } = {},
  ): Buffer {
    const cookie = o.cookie ?? this.nextCookie();
    this.write(encodeRequest(type, offset, length, cookie, o.flags ?? 0));
    if (o.payload) this.write(o.payload);
    return cookie;
  }

  async simpleReply(dataLength = 0): Promise<{ error: number; cookie: Buffer; data: Buffer }> {
    const h = await this.read(16);
    assert.equal(h.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC, 'simple reply magic');
    const error = h.readUInt32BE(4);
    const data = error === 0 && dataLength > 0 ? Buffer.from(await this.read(dataLength)) : Buffer.alloc(0);
    return { error, cookie: Buffer.from(h.subarray(8, 16)), data };
  }

  async chunk(): Promise<{ flags: number; type: number; cookie: Buffer; payload: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readUInt32BE(0), P.NBD_STRUCTURED_REPLY_MAGIC, 'structured reply magic');
    const length = h.readUInt32BE(16);
    const payload = length ? Buffer.from(await this.read(length)) : Buffer.alloc(0);
    return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: Buffer.from(h.subarray(8, 16)), payload };
  }
}

function encodeRequest(type: number, offset: number, length: number, cookie: Buffer, flags = 0): Buffer {
  const r = Buffer.alloc(28);
  r.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  r.writeUInt16BE(flags, 4);
  r.writeUInt16BE(type, 6);
  cookie.copy(r, 8);
  r.writeBigUInt64BE(BigInt(offset), 16);
  r.writeUInt32BE(length, 24);
  return r;
}

let dir = '';
let seq = 0;

interface Running {
  server: NbdServer;
  path: string;
  errors: NbdError[];
}

async function start(exp: NbdExport, extra: Partial<NbdServerOptions> = {}): Promise<Running> {
  const errors: NbdError[] = [];
  const server = new NbdServer({ name: 'disk', export: exp, onError: (e) => errors.push(e), ...extra });
  const path = join(dir, `s${seq++}.sock`);
  await server.listen(path);
  return { server, path, errors };
}

/** A fresh client gets a correct read: the server is still serving. */
async function assertServes(path: string): Promise<void> {
  const c = await Raw.connect(path);
  await c.open('disk');
  c.request(P.NBD_CMD_READ, 8192, 4096);
  const r = await c.simpleReply(4096);
  assert.equal(r.error, 0);
  assert.deepEqual(r.data, expected(8192, 4096));
  c.destroy();
}

describe('NBD server: handshake and options', () => {
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbd-proto-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('greets fixed newstyle + no zeroes; INFO gives size, flags, block sizes; GO enters transmission', async () => {
    const { server, path } = await start(patternExport());
    const c = await Raw.connect(path);
    const hs = await c.greet();
    assert.equal(hs, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
    const info = await c.infoOrGo(P.NBD_OPT_INFO, 'disk', [P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME]);
    assert.equal(info.at(-1)!.type, P.NBD_REP_ACK);
    const byType = new Map(info.slice(0, -1).map((r) => [r.data.readUInt16BE(0), r.data]));
    const exp = byType.get(P.NBD_INFO_EXPORT)!;
    assert.equal(Number(exp.readBigUInt64BE(2)), 64 * MiB);
    const flags = exp.readUInt16BE(10);
    assert.ok(flags & P.NBD_FLAG_HAS_FLAGS && flags & P.NBD_FLAG_READ_ONLY);
    assert.equal(flags & P.NBD_FLAG_SEND_DF, 0, 'no DF before structured replies');
    const bs = byType.get(P.NBD_INFO_BLOCK_SIZE)!;
    assert.deepEqual([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)], [1, 4096, 32 * MiB]);
    assert.equal(byType.get(P.NBD_INFO_NAME)!.subarray(2).toString(), 'disk');
    const go = await c.infoOrGo(P.NBD_OPT_GO, 'disk');
    assert.equal(go.at(-1)!.type, P.NBD_REP_ACK);
    c.request(P.NBD_CMD_READ, 0, 4096);
    assert.deepEqual((await c.simpleReply(4096)).data, expected(0, 4096));
    c.destroy();
    await server.close();
  });

  it('unknown export → ERR_UNKNOWN and the client may retry; "" is the default export', async () => {
    const { server, path } = await start(patternExport());
    const c = await Raw.connect(path);
    await c.greet();
    const bad = await c.infoOrGo(P.NBD_OPT_GO, 'nope');
    assert.equal(bad.length, 1);
    assert.equal(bad[0]!.type, P.NBD_REP_ERR_UNKNOWN);
    assert.match(bad[0]!.data.toString(), /nope/);
    const ok = await c.infoOrGo(P.NBD_OPT_GO, '');
    assert.equal(ok.at(-1)!.type, P.NBD_REP_ACK);
    c.destroy();
    await server.close();
  });

  it('LIST names the export; unknown option → UNSUP; STARTTLS → POLICY; bad GO → INVALID', async () => {
    const { server, path } = await start(patternExport(), { description: 'synthesized disk' });
    const c = await Raw.connect(path);
    await c.greet();
    c.sendOption(P.NBD_OPT_LIST);
    const entry = await c.optionReply();
    assert.equal(entry.type, P.NBD_REP_SERVER);
    const n = entry.data.readUInt32BE(0);
    assert.equal(entry.data.toString('utf8', 4, 4 + n), 'disk');
    assert.equal(entry.data.toString('utf8', 4 + n), 'synthesized disk');
    assert.equal((await c.optionReply()).type, P.NBD_REP_ACK);
    c.sendOption(P.NBD_OPT_LIST, Buffer.from('x'));
    assert.equal((await c.optionReply()).type, P.NBD_REP_ERR_INVALID);
    c.sendOption(42);
    const unsup = await c.optionReply();
    assert.deepEqual([unsup.option, unsup.type], [42, P.NBD_REP_ERR_UNSUP]);
    c.sendOption(P.NBD_OPT_STARTTLS);
    assert.equal((await c.optionReply()).type, P.NBD_REP_ERR_POLICY);
    c.sendOption(P.NBD_OPT_GO, Buffer.from([0, 0, 0, 200, 1, 2]));
    assert.equal((await c.optionReply()).type, P.NBD_REP_ERR_INVALID);
    c.sendOption(P.NBD_OPT_ABORT);
    assert.equal((await c.optionReply()).type, P.NBD_REP_ACK);
    assert.ok(await c.closedWithin(2000), 'closed after ABORT');
    await server.close();
  });

  it('EXPORT_NAME (old way): 124 zero bytes unless NO_ZEROES; an unknown name is a disconnect', async () => {
    const { server, path } = await start(patternExport());
    for (const noZeroes of [true, false]) {
      const c = await Raw.connect(path);
      await c.greet(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
      c.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
      const r = await c.read(noZeroes ? 10 : 134);
      assert.equal(Number(r.readBigUInt64BE(0)), 64 * MiB);
      assert.ok(r.readUInt16BE(8) & P.NBD_FLAG_READ_ONLY);
      if (!noZeroes) assert.ok(r.subarray(10).every((b) => b === 0));
      c.request(P.NBD_CMD_READ, 4096, 512);
      assert.deepEqual((await c.simpleReply(512)).data, expected(4096, 512));
      c.destroy();
    }
    const c = await Raw.connect(path);
    await c.greet();
    c.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('other'));
    assert.ok(await c.closedWithin(2000));
    await server.close();
  });

  it('structured replies and base:allocation: SET before SR is invalid, LIST lists, SET selects', async () => {
    const { server, path } = await start(patternExport());
    const c = await Raw.connect(path);
    await c.greet();
    const early = await c.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'disk', [P.BASE_ALLOCATION]);
    assert.equal(early[0]!.type, P.NBD_REP_ERR_INVALID);
    c.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    assert.equal((await c.optionReply()).type, P.NBD_REP_ACK);
    c.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    assert.equal((await c.optionReply()).type, P.NBD_REP_ERR_INVALID, 'second time');
    const listed = await c.metaContext(P.NBD_OPT_LIST_META_CONTEXT, 'disk', []);
    assert.deepEqual(
      listed.map((r) => r.type),
      [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK],
    );
    assert.equal(listed[0]!.data.subarray(4).toString(), P.BASE_ALLOCATION);
    const none = await c.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'disk', ['qemu:dirty-bitmap:x', 'base:']);
    assert.deepEqual(
      none.map((r) => r.type),
      [P.NBD_REP_ACK],
      'unknown and wildcard queries select nothing',
    );
    const set = await c.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'disk', [P.BASE_ALLOCATION]);
    assert.equal(set[0]!.type, P.NBD_REP_META_CONTEXT);
    const id = set[0]!.data.readUInt32BE(0);
    const go = await c.infoOrGo(P.NBD_OPT_GO, 'disk');
    const flags = go[0]!.data.readUInt16BE(10);
    assert.ok(flags & P.NBD_FLAG_SEND_DF);

    // READ comes back as one OFFSET_DATA chunk marked DONE.
    const cookie = c.request(P.NBD_CMD_READ, 12288, 8192);
    const ch = await c.chunk();
    assert.deepEqual([ch.type, ch.flags, ch.cookie], [P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_FLAG_DONE, cookie]);
    assert.equal(Number(ch.payload.readBigUInt64BE(0)), 12288);
    assert.deepEqual(ch.payload.subarray(8), expected(12288, 8192));

    // BLOCK_STATUS: data for the first MiB, then hole|zero; REQ_ONE gives one extent within the request.
    c.request(P.NBD_CMD_BLOCK_STATUS, 512 * KiB, 2 * MiB);
    const bs = await c.chunk();
    assert.equal(bs.type, P.NBD_REPLY_TYPE_BLOCK_STATUS);
    assert.equal(bs.payload.readUInt32BE(0), id);
    const ext = [];
    for (let at = 4; at < bs.payload.length; at += 8) {
      ext.push([bs.payload.readUInt32BE(at), bs.payload.readUInt32BE(at + 4)]);
    }
    assert.deepEqual(ext, [
      [512 * KiB, 0],
      [1.5 * MiB, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO],
    ]);
    c.request(P.NBD_CMD_BLOCK_STATUS, 2 * MiB, 4096, { flags: P.NBD_CMD_FLAG_REQ_ONE });
    const one = await c.chunk();
    assert.equal(one.payload.length, 12);
    assert.deepEqual([one.payload.readUInt32BE(4), one.payload.readUInt32BE(8)], [4096, 3]);

    // Errors come as structured error chunks with a message.
    c.request(P.NBD_CMD_READ, 64 * MiB, 4096);
    const err = await c.chunk();
    assert.equal(err.type, P.NBD_REPLY_TYPE_ERROR);
    assert.equal(err.payload.readUInt32BE(0), P.NbdErrno.EINVAL);
    assert.match(err.payload.subarray(6).toString(), /invalid/);
    c.request(P.NBD_CMD_READ, 0, 0xffffffff);
    assert.equal((await c.chunk()).payload.readUInt32BE(0), P.NbdErrno.EOVERFLOW);
    c.request(P.NBD_CMD_READ, 0, 0);
    assert.equal((await c.chunk()).type, P.NBD_REPLY_TYPE_NONE);
    c.destroy();
    await server.close();
  });

  it('structuredReplies: false refuses NBD_OPT_STRUCTURED_REPLY and meta contexts with ERR_UNSUP', async () => {
    const { server, path } = await start(patternExport(), { structuredReplies: false });
    const c = await Raw.connect(path);
    await c.greet();
    c.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    assert.equal((await c.optionReply()).type, P.NBD_REP_ERR_UNSUP);
    const m = await c.metaContext(P.NBD_OPT_LIST_META_CONTEXT, 'disk', []);
    assert.equal(m[0]!.type, P.NBD_REP_ERR_UNSUP);
    c.destroy();
    await server.close();
  });

  it('an export without blockStatus offers no context; BLOCK_STATUS is then EINVAL', async () => {
    const plain = patternExport();
    delete plain.blockStatus;
    const { server, path } = await start(plain);
    const c = await Raw.connect(path);
    await c.greet();
    c.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    await c.optionReply();
    const set = await c.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'disk', [P.BASE_ALLOCATION]);
    assert.deepEqual(
      set.map((r) => r.type),
      [P.NBD_REP_ACK],
    );
    await c.infoOrGo(P.NBD_OPT_GO, 'disk');
    c.request(P.NBD_CMD_BLOCK_STATUS, 0, 4096);
    assert.equal((await c.chunk()).payload.readUInt32BE(0), P.NbdErrno.EINVAL);
    c.destroy();
    await server.close();
  });
});

describe('NBD server: transmission', () => {
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbd-proto-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('simple replies: data, EINVAL past the end, EPERM for writes (payload skipped), FLUSH, bad cmd', async () => {
    const { server, path } = await start(patternExport());
    const c = await Raw.connect(path);
    await c.open('disk');
    const cookie = c.request(P.NBD_CMD_READ, 64 * MiB - 4096, 4096);
    const last = await c.simpleReply(4096);
    assert.deepEqual([last.error, last.cookie], [0, cookie]);
    assert.deepEqual(last.data, expected(64 * MiB - 4096, 4096));
    for (const [off, len] of [
      [64 * MiB - 4096, 4097],
      [64 * MiB + 1, 0],
      [2 ** 62, 4096],
    ] as const) {
      c.request(P.NBD_CMD_READ, off, len);
      assert.equal((await c.simpleReply()).error, P.NbdErrno.EINVAL, `read ${len} at ${off}`);
    }
    c.request(P.NBD_CMD_READ, 0, 0xffffffff);
    assert.equal((await c.simpleReply()).error, P.NbdErrno.EINVAL, '4 GiB read');
    c.request(P.NBD_CMD_WRITE, 0, 64 * KiB, { payload: Buffer.alloc(64 * KiB, 0xee) });
    assert.equal((await c.simpleReply()).error, P.NbdErrno.EPERM);
    c.request(P.NBD_CMD_TRIM, 0, 4096);
    assert.equal((await c.simpleReply()).error, P.NbdErrno.EPERM);
    c.request(P.NBD_CMD_WRITE_ZEROES, 0, 4096);
    assert.equal((await c.simpleReply()).error, P.NbdErrno.EPERM);
    c.request(P.NBD_CMD_FLUSH, 0, 0);
    assert.equal((await c.simpleReply()).error, 0);
    c.request(P.NBD_CMD_CACHE, 0, 4096);
    assert.equal((await c.simpleReply()).error, P.NbdErrno.EINVAL);
    c.request(99, 0, 4096);
    assert.equal((await c.simpleReply()).error, P.NbdErrno.EINVAL);
    c.request(P.NBD_CMD_READ, 0, 4096, { flags: 1 << 9 });
    assert.equal((await c.simpleReply()).error, P.NbdErrno.EINVAL, 'unknown command flag');
    c.request(P.NBD_CMD_BLOCK_STATUS, 0, 4096);
    assert.equal((await c.simpleReply()).error, P.NbdErrno.EINVAL, 'no context selected');
    // Still in sync after all that: the write payload was consumed, not parsed as requests.
    c.request(P.NBD_CMD_READ, 0, 4096);
    assert.deepEqual((await c.simpleReply(4096)).data, expected(0, 4096));
    c.request(P.NBD_CMD_DISC, 0, 0);
    assert.ok(await c.closedWithin(2000), 'closed after DISC');
    await server.close();
    const s = server.stats;
    assert.equal(s.reads, 2);
    assert.equal(s.errorReplies, 11);
  });

  it('a read that rejects gives that request EIO, is reported, and the connection keeps working', async () => {
    const { server, path, errors } = await start(patternExport({ fail: (o) => o === 40960 }));
    for (const structured of [false, true]) {
      const c = await Raw.connect(path);
      await c.open('disk', { structured });
      c.request(P.NBD_CMD_READ, 40960, 4096);
      if (structured) {
        const ch = await c.chunk();
        assert.equal(ch.type, P.NBD_REPLY_TYPE_ERROR);
        assert.equal(ch.payload.readUInt32BE(0), P.NbdErrno.EIO);
        assert.match(ch.payload.subarray(6).toString(), /injected failure/);
      } else {
        assert.equal((await c.simpleReply()).error, P.NbdErrno.EIO);
      }
      c.request(P.NBD_CMD_READ, 0, 4096);
      if (structured) assert.deepEqual((await c.chunk()).payload.subarray(8), expected(0, 4096));
      else assert.deepEqual((await c.simpleReply(4096)).data, expected(0, 4096));
      c.destroy();
    }
    await server.close();
    const exportErrors = errors.filter((e) => e.kind === 'export');
    assert.equal(exportErrors.length, 2);
    assert.equal(exportErrors[0]!.details['offset'], 40960);
    assert.match(String((exportErrors[0]!.cause as Error).message), /injected/);
  });

  it('a slow read does not hold up others on the same connection; replies carry the right cookies', async () => {
    const { server, path } = await start(patternExport({ delay: (o) => (o === 0 ? 500 : 0) }));
    const c = await Raw.connect(path);
    await c.open('disk');
    const t0 = Date.now();
    const slow = c.request(P.NBD_CMD_READ, 0, 4096);
    const fast = c.request(P.NBD_CMD_READ, MiB, 4096);
    const first = await c.simpleReply(4096);
    const tFast = Date.now() - t0;
    assert.deepEqual(first.cookie, fast);
    assert.deepEqual(first.data, expected(MiB, 4096));
    assert.ok(tFast < 300, `fast read answered after ${tFast} ms`);
    const second = await c.simpleReply(4096);
    assert.deepEqual(second.cookie, slow);
    assert.deepEqual(second.data, expected(0, 4096));
    assert.ok(Date.now() - t0 >= 490);
    c.destroy();
    await server.close();
  });

  it('replies never interleave: 300 concurrent reads of mixed sizes and random delays parse cleanly', async () => {
    const delays = new Map<number, number>();
    const { server, path } = await start(patternExport({ delay: (o) => delays.get(o) ?? 0 }));
    for (const structured of [false, true]) {
      const c = await Raw.connect(path);
      await c.open('disk', { structured });
      const want = new Map<string, [number, number]>();
      for (let i = 0; i < 300; i++) {
        const off = i * 131072;
        const len = [512, 4096, 65536, 131072][i % 4]!;
        delays.set(off, (i * 37) % 23);
        want.set(c.request(P.NBD_CMD_READ, off, len).toString('hex'), [off, len]);
      }
      for (let i = 0; i < 300; i++) {
        let cookie: Buffer;
        let data: Buffer;
        if (structured) {
          const ch = await c.chunk();
          cookie = ch.cookie;
          data = ch.payload.subarray(8);
        } else {
          const h = await c.read(16);
          assert.equal(h.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
          cookie = Buffer.from(h.subarray(8, 16));
          data = await c.read(want.get(cookie.toString('hex'))![1]);
        }
        const w = want.get(cookie.toString('hex'));
        assert.ok(w, 'reply for a pending cookie');
        assert.ok(data.equals(expected(w[0], w[1])), `data for read at ${w[0]}`);
        want.delete(cookie.toString('hex'));
      }
      c.destroy();
    }
    await server.close();
  });

  it('a writable export: WRITE, FUA, FLUSH, WRITE_ZEROES, TRIM reach the callbacks; ENOSPC past the end', async () => {
    const disk = Buffer.alloc(MiB);
    const calls: string[] = [];
    const exp: NbdExport = {
      size: disk.length,
      readOnly: false,
      async read(o, l, b) {
        disk.copy(b, 0, o, o + l);
      },
      async write(o, d, fua) {
        calls.push(`write ${o} ${d.length} ${fua}`);
        d.copy(disk, o);
      },
      async flush() {
        calls.push('flush');
      },
      async writeZeroes(o, l) {
        calls.push(`zero ${o} ${l}`);
        disk.fill(0, o, o + l);
      },
      async trim(o, l) {
        calls.push(`trim ${o} ${l}`);
      },
    };
    const { server, path } = await start(exp);
    const c = await Raw.connect(path);
    const { flags } = await c.open('disk');
    const want = P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES;
    assert.equal(flags & want, want);
    assert.equal(flags & P.NBD_FLAG_READ_ONLY, 0);
    const big = Buffer.alloc(200 * KiB, 0x5a);
    c.request(P.NBD_CMD_WRITE, 4096, big.length, { payload: big, flags: P.NBD_CMD_FLAG_FUA });
    assert.equal((await c.simpleReply()).error, 0);
    c.request(P.NBD_CMD_WRITE_ZEROES, 8192, 4096);
    assert.equal((await c.simpleReply()).error, 0);
    c.request(P.NBD_CMD_TRIM, 0, 4096);
    assert.equal((await c.simpleReply()).error, 0);
    c.request(P.NBD_CMD_FLUSH, 0, 0);
    assert.equal((await c.simpleReply()).error, 0);
    c.request(P.NBD_CMD_WRITE, MiB - 10, 20, { payload: Buffer.alloc(20) });
    assert.equal((await c.simpleReply()).error, P.NbdErrno.ENOSPC);
    c.request(P.NBD_CMD_READ, 4096, 8192);
    const r = await c.simpleReply(8192);
    assert.ok(r.data.subarray(0, 4096).every((b) => b === 0x5a));
    assert.ok(r.data.subarray(4096).every((b) => b === 0));
    assert.deepEqual(calls, [`write 4096 ${200 * KiB} true`, 'zero 8192 4096', 'trim 0 4096', 'flush']);
    c.destroy();
    await server.close();
    assert.equal(server.stats.bytesWritten, 200 * KiB);
  });
});

describe('NBD server: hostile and broken clients', () => {
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbd-proto-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('garbage for an option, unknown client flags, bad request magic: disconnected, others served', async () => {
    const { server, path, errors } = await start(patternExport());
    const a = await Raw.connect(path);
    await a.greet();
    a.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    assert.ok(await a.closedWithin(2000), 'bad option magic');
    const b = await Raw.connect(path);
    await b.greet(0xff);
    assert.ok(await b.closedWithin(2000), 'unknown client flags');
    const c = await Raw.connect(path);
    await c.open('disk');
    c.write(Buffer.alloc(28, 0x41));
    assert.ok(await c.closedWithin(2000), 'bad request magic');
    await assertServes(path);
    await server.close();
    assert.equal(errors.filter((e) => e.kind === 'protocol').length, 3);
  });

  it('an option claiming 2^31 bytes: ERR_TOO_BIG and a disconnect, without buffering it', async () => {
    const { server, path } = await start(patternExport());
    const c = await Raw.connect(path);
    await c.greet();
    c.sendOption(P.NBD_OPT_GO, Buffer.alloc(0), 2 ** 31);
    c.write(Buffer.alloc(MiB, 1)); // the start of the "payload"
    const r = await c.optionReply();
    assert.equal(r.type, P.NBD_REP_ERR_TOO_BIG);
    assert.ok(await c.closedWithin(2000));
    await assertServes(path);
    await server.close();
  });

  it('a 4 GiB WRITE is a disconnect (its payload is not read); half a request then EOF is harmless', async () => {
    const { server, path } = await start(patternExport());
    const c = await Raw.connect(path);
    await c.open('disk');
    c.request(P.NBD_CMD_WRITE, 0, 0xffffffff);
    c.write(Buffer.alloc(256 * KiB));
    assert.ok(await c.closedWithin(2000));
    const h = await Raw.connect(path);
    await h.open('disk');
    h.write(encodeRequest(P.NBD_CMD_READ, 0, 4096, Buffer.alloc(8)).subarray(0, 11));
    await sleep(50);
    h.socket.end();
    assert.ok(await h.closedWithin(2000));
    const g = await Raw.connect(path);
    g.write(Buffer.from([0, 0, 0]));
    g.destroy();
    await assertServes(path);
    await server.close();
  });

  it('1000 pipelined requests: all answered, never more than maxInflight admitted at once', async () => {
    const { server, path } = await start(patternExport({ delay: () => 1 }));
    const c = await Raw.connect(path);
    await c.open('disk');
    const batch: Buffer[] = [];
    const want = new Map<string, number>();
    for (let i = 0; i < 1000; i++) {
      const cookie = c.nextCookie();
      want.set(cookie.toString('hex'), i * 4096);
      batch.push(encodeRequest(P.NBD_CMD_READ, i * 4096, 4096, cookie));
    }
    c.write(Buffer.concat(batch));
    for (let i = 0; i < 1000; i++) {
      const r = await c.simpleReply(4096);
      const off = want.get(r.cookie.toString('hex'));
      assert.notEqual(off, undefined);
      assert.ok(r.data.equals(expected(off!, 4096)));
      want.delete(r.cookie.toString('hex'));
    }
    c.destroy();
    await server.close();
    assert.equal(server.stats.reads, 1000);
    assert.ok(server.stats.peakInflight <= 64, `peak ${server.stats.peakInflight}`);
    assert.ok(server.stats.peakInflight > 1, 'served concurrently');
  });

  it('a client that sends 300 × 1 MiB reads and does not read replies: the server holds ≤ 64 MiB', async () => {
    const { server, path } = await start(patternExport());
    const c = await Raw.connect(path);
    await c.open('disk');
    c.socket.pause();
    const base = process.memoryUsage().arrayBuffers;
    const batch: Buffer[] = [];
    for (let i = 0; i < 300; i++) batch.push(encodeRequest(P.NBD_CMD_READ, (i % 64) * MiB, MiB, c.nextCookie()));
    c.write(Buffer.concat(batch));
    await sleep(700);
    const held = process.memoryUsage().arrayBuffers - base;
    const s = server.stats;
    assert.ok(s.peakInflightBytes <= 64 * MiB, `peak in-flight ${s.peakInflightBytes}`);
    assert.ok(s.reads < 300, `the server stopped reading requests (${s.reads} served)`);
    assert.ok(held < 160 * MiB, `array buffers grew by ${Math.round(held / MiB)} MiB`);
    c.socket.resume();
    for (let i = 0; i < 300; i++) {
      const r = await c.simpleReply(MiB);
      assert.equal(r.error, 0);
    }
    assert.equal(server.stats.reads, 300);
    c.destroy();
    await server.close();
  });

  it('disconnects mid-reply and during a slow read: server survives, close() waits for the read', async () => {
    let settled = false;
    const { server, path } = await start(
      patternExport({
        delay: (o) => {
          if (o !== 5 * MiB) return 0;
          setTimeout(() => (settled = true), 400);
          return 400;
        },
      }),
    );
    const a = await Raw.connect(path);
    await a.open('disk');
    a.request(P.NBD_CMD_READ, 0, 32 * MiB);
    await a.read(1000);
    a.destroy();
    const b = await Raw.connect(path);
    await b.open('disk');
    b.request(P.NBD_CMD_READ, 5 * MiB, 4096);
    await sleep(50);
    b.destroy();
    await assertServes(path);
    const t0 = Date.now();
    await server.close();
    assert.ok(settled, 'close() resolved only after the slow read settled');
    assert.ok(Date.now() - t0 >= 250);
  });

  it('maxConnections: extra connections are closed at once; a stalled handshake times out', async () => {
    const { server, path, errors } = await start(patternExport(), { maxConnections: 2, handshakeTimeoutMs: 300 });
    const a = await Raw.connect(path);
    const b = await Raw.connect(path);
    const c = await Raw.connect(path);
    assert.ok(await c.closedWithin(1000), 'third connection refused');
    assert.ok(await a.closedWithin(2000), 'silent client dropped after the handshake timeout');
    assert.ok(await b.closedWithin(2000));
    await assertServes(path);
    await server.close();
    assert.ok(errors.some((e) => /timed out/.test(e.message)));
    assert.ok(errors.some((e) => /refused/.test(e.message)));
  });

  it('no unhandled rejections so far', () => {
    assert.deepEqual(unhandled, []);
  });
});

describe('NBD server: close() and the socket file', () => {
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbd-proto-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('close(): in-flight reads are answered, later requests get ESHUTDOWN, then the connection ends', async () => {
    const { server, path } = await start(patternExport({ delay: (o) => (o === 0 ? 300 : 0) }));
    const c = await Raw.connect(path);
    await c.open('disk');
    const slow = c.request(P.NBD_CMD_READ, 0, 4096);
    await sleep(50);
    const closed = server.close();
    await sleep(20);
    const late = c.request(P.NBD_CMD_READ, 4096, 4096);
    const r1 = await c.simpleReply();
    assert.deepEqual([r1.cookie, r1.error], [late, P.NbdErrno.ESHUTDOWN]);
    const r2 = await c.simpleReply(4096);
    assert.deepEqual([r2.cookie, r2.error], [slow, 0]);
    assert.deepEqual(r2.data, expected(0, 4096));
    assert.ok(await c.closedWithin(2000), 'connection ended');
    await closed;
    await assert.rejects(stat(path), { code: 'ENOENT' });
    assert.equal(server.close(), closed, 'close() is idempotent');
  });

  it('the socket is 0600; a stale one is replaced; a live one or a regular file is refused', async () => {
    const path = join(dir, 'x.sock');
    const exp = patternExport();
    const one = new NbdServer({ name: 'disk', export: exp });
    await one.listen(path);
    assert.equal((await stat(path)).mode & 0o777, 0o600);
    const two = new NbdServer({ name: 'disk', export: exp });
    await assert.rejects(two.listen(path), BusyError);
    await one.close();

    // A stale socket file: bound by a server that "crashed" (we simulate by linking one away).
    const crashed = new NbdServer({ name: 'disk', export: exp });
    await crashed.listen(path);
    const keep = join(dir, 'keep.sock');
    await link(path, keep);
    await crashed.close(); // removes `path`; `keep` stays as a dead socket file
    await rename(keep, path);
    const three = new NbdServer({ name: 'disk', export: exp });
    await three.listen(path);
    await assertServes(path);
    await three.close();

    const file = join(dir, 'plain');
    await writeFile(file, 'not a socket');
    await assert.rejects(new NbdServer({ name: 'disk', export: exp }).listen(file), BusyError);
    assert.equal((await stat(file)).isFile(), true, 'left alone');
  });

  it('close() leaves a successor’s socket at the same path alone', async () => {
    const path = join(dir, 'y.sock');
    const exp = patternExport();
    const first = new NbdServer({ name: 'disk', export: exp });
    await first.listen(path);
    await unlink(path); // someone removed our file and a new server took the path
    const second = new NbdServer({ name: 'disk', export: exp });
    await second.listen(path);
    await first.close();
    await assertServes(path);
    await second.close();
  });

  it('TCP on 127.0.0.1 for tests', async () => {
    const server = new NbdServer({ name: 'disk', export: patternExport() });
    const port = await server.listenTcp();
    const c = await Raw.connect(port);
    await c.open('disk');
    c.request(P.NBD_CMD_READ, 4096, 4096);
    assert.deepEqual((await c.simpleReply(4096)).data, expected(4096, 4096));
    c.destroy();
    await server.close();
  });
});

describe('NBD extents', () => {
  it('allocationStatus describes data and holes inside the range, merged', () => {
    const data = [
      { start: 0, length: 4096 },
      { start: 4096, length: 4096 },
      { start: 65536, length: 8192 },
    ];
    const H = P.NBD_STATE_HOLE | P.NBD_STATE_ZERO;
    assert.deepEqual(allocationStatus(data, 0, 100_000), [
      { length: 8192, flags: 0 },
      { length: 65536 - 8192, flags: H },
      { length: 8192, flags: 0 },
      { length: 100_000 - 73728, flags: H },
    ]);
    assert.deepEqual(allocationStatus(data, 70000, 1000), [{ length: 1000, flags: 0 }]);
    assert.deepEqual(allocationStatus([], 10, 20), [{ length: 20, flags: H }]);
  });

  it('clipExtents: REQ_ONE gives one extent within the request; others stop at the end; junk is refused', () => {
    const req = (offset: number, length: number, flags = 0): P.NbdRequest => ({
      type: P.NBD_CMD_BLOCK_STATUS,
      flags,
      cookie: Buffer.alloc(8),
      offset,
      length,
    });
    const got = [
      { length: 1000, flags: 0 },
      { length: 5000, flags: 3 },
      { length: 100, flags: 0 },
    ];
    assert.deepEqual(clipExtents(got, req(0, 500, P.NBD_CMD_FLAG_REQ_ONE), 10_000), [{ length: 500, flags: 0 }]);
    assert.deepEqual(clipExtents(got, req(0, 2000), 10_000), [
      { length: 1000, flags: 0 },
      { length: 5000, flags: 3 },
    ]);
    assert.deepEqual(clipExtents(got, req(0, 2000), 3000), [
      { length: 1000, flags: 0 },
      { length: 2000, flags: 3 },
    ]);
    assert.equal(clipExtents([{ length: 0, flags: 0 }], req(0, 10), 100), null);
    assert.equal(clipExtents([], req(0, 10), 100), null);
  });
});
