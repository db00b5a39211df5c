/**
 * Qcow2Writer: streams a qcow2 v3 image whose backing file is the base disk and which holds only
 * the clusters that changed. Cost ∝ changes, not disk size: nothing is read or written for
 * clusters the caller does not touch (they stay unallocated and read through to the base).
 *
 * File layout (host clusters, in the order they are allocated):
 *   0            header, backing-format extension, backing file name   (written last)
 *   1 … d        data clusters, in ascending guest order, as each one completes
 *   then         L2 tables (only those with entries), L1 table,
 *                refcount table, refcount blocks                       (written by finish())
 * Every host cluster has refcount 1, so every L1/L2 entry carries the COPIED flag. A cluster
 * that ends up all zero gets the v3 zero flag and no host cluster. A partially changed cluster
 * is completed from `base` (the backing file's contents), since a qcow2 cluster is all or
 * nothing.
 */
import { PAGE_SIZE } from '../../util/page.js';
import type { ChunkSource } from '../../delta/source.js';
import { CloudletError, UnsupportedError } from '../../util/errors.js';
import { decodeHeader, encodeHeader, type Qcow2Header } from './qcow2-header.js';
import { OrderedWriter } from './ordered-writer.js';
import { OutputFile } from './output-file.js';
import type { WriterStats } from './writer.js';

export interface Qcow2WriterOptions {
  /** Guest-visible size; may be larger or smaller than the backing file. */
  virtualSize: number;
  /** Stored in the header as is; a relative name is resolved against the output's directory. */
  backingFile: string;
  /** Stored in the backing-format extension, so qemu never probes the base. */
  backingFormat: string;
  /** The backing file's guest-visible bytes: fills the untouched part of a changed cluster. */
  base: ChunkSource;
  /** Power of two, 4 KiB … 2 MiB; default 64 KiB (QEMU's default). */
  clusterSize?: number;
  /** fsync on finish (default true; see util/atomic.ts). */
  durable?: boolean;
}

const MIN_CLUSTER = PAGE_SIZE;
const MAX_CLUSTER = 2 * 1024 * 1024;
/** Completed data clusters are gathered into writes of this size. */
const WRITE_BEHIND = 4 * 1024 * 1024;
/** QEMU refuses L1 tables larger than 32 MiB. */
const MAX_L1_BYTES = 32 * 1024 * 1024;
/** L1/L2 entry bit 63: refcount is exactly one (the entry may be written in place). */
const COPIED_HI = 0x80000000;
/** Standard cluster descriptor bit 0: the cluster reads as zero. */
const ZERO_FLAG_LO = 1;

export class Qcow2Writer extends OrderedWriter {
  readonly format = 'qcow2';
  private readonly clusterBits: number;
  /** Next free host cluster; cluster 0 is the header. */
  private nextHost = 1;
  /** Completed guest clusters, ascending: guest index → host offset (0 = zero flag). */
  private readonly guest: number[] = [];
  private readonly host: number[] = [];
  private zeroClusters = 0;
  /** The guest cluster being assembled (-1: none), its bytes and which 4 KiB chunks are set. */
  private pendingIndex = -1;
  private readonly pending: Buffer;
  private readonly covered: Uint8Array;
  /** Completed data clusters not yet written: they start at host offset wbHost. */
  private readonly wb: Buffer;
  private wbLength = 0;
  private wbHost = 0;
  private readonly zeros: Buffer;
  /** Base bytes of a cluster with several gaps. */
  private scratch: Buffer | null = null;

  private constructor(
    file: OutputFile,
    path: string,
    virtualSize: number,
    private readonly clusterSize: number,
    private readonly backingFile: string,
    private readonly backingFormat: string,
    private readonly base: ChunkSource,
  ) {
    super(file, path, virtualSize);
    this.clusterBits = Math.log2(clusterSize);
    this.pending = Buffer.alloc(clusterSize);
    this.covered = new Uint8Array(clusterSize / PAGE_SIZE);
    this.wb = Buffer.allocUnsafe(Math.max(WRITE_BEHIND, clusterSize));
    this.wbHost = clusterSize;
    this.zeros = Buffer.alloc(clusterSize);
  }

  static async create(path: string, opts: Qcow2WriterOptions): Promise<Qcow2Writer> {
    const clusterSize = opts.clusterSize ?? 65536;
    if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < MIN_CLUSTER || clusterSize > MAX_CLUSTER) {
      throw new UnsupportedError(`qcow2 cluster size must be a power of two from 4 KiB to 2 MiB (got ${clusterSize})`);
    }
    if (!Number.isSafeInteger(opts.virtualSize) || opts.virtualSize < 0 || opts.virtualSize % 512 !== 0) {
      // QEMU keeps disk sizes in 512-byte sectors; sizes from qemu-img info always are.
      throw new UnsupportedError(`qcow2 virtual size must be a multiple of 512 bytes (got ${opts.virtualSize})`);
    }
    if (l1Entries(opts.virtualSize, clusterSize) * 8 > MAX_L1_BYTES) {
      throw new UnsupportedError(`a ${opts.virtualSize}-byte disk needs a larger cluster size than ${clusterSize}`);
    }
    // Fails early on a name that cannot be stored.
    encodeHeader({
      ...emptyHeader(clusterSize, opts.virtualSize),
      backingFile: opts.backingFile,
      backingFormat: opts.backingFormat,
    });
    const file = await OutputFile.create(path, { durable: opts.durable });
    return new Qcow2Writer(file, path, opts.virtualSize, clusterSize, opts.backingFile, opts.backingFormat, opts.base);
  }

  protected async readInto(offset: number, length: number, out: Buffer): Promise<void> {
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const ci = Math.floor(pos / this.clusterSize);
      const cStart = ci * this.clusterSize;
      const n = Math.min(end, cStart + this.clusterSize) - pos;
      await this.readCluster(ci, pos - cStart, n, out.subarray(pos - offset, pos - offset + n));
      pos += n;
    }
  }

  /** The last cluster, the data still in the write-behind buffer, then the metadata. */
  protected async complete(): Promise<WriterStats> {
    await this.completePending();
    await this.flushWriteBehind();
    return this.writeMetadata();
  }

  /** Copies (or zeroes, when data is null) a range into the clusters it spans. */
  protected async put(offset: number, length: number, data: Uint8Array | null): Promise<void> {
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const ci = Math.floor(pos / this.clusterSize);
      if (ci !== this.pendingIndex) {
        await this.completePending();
        this.pendingIndex = ci;
        this.pending.fill(0);
        this.covered.fill(0);
      }
      const cStart = ci * this.clusterSize;
      const n = Math.min(end, cStart + this.clusterSize) - pos;
      const at = pos - cStart;
      if (data) this.pending.set(data.subarray(pos - offset, pos - offset + n), at);
      else this.pending.fill(0, at, at + n);
      this.covered.fill(1, at / PAGE_SIZE, Math.ceil((at + n) / PAGE_SIZE));
      pos += n;
    }
  }

  /** Fills the pending cluster's untouched chunks from the base and stores it. */
  private async completePending(): Promise<void> {
    const ci = this.pendingIndex;
    if (ci < 0) return;
    this.pendingIndex = -1;
    const cStart = ci * this.clusterSize;
    const limit = Math.min(this.clusterSize, this.virtualSize - cStart);
    const gaps = this.uncoveredRuns(limit);
    const first = gaps[0];
    const last = gaps[gaps.length - 1];
    if (first && last && gaps.length === 1) {
      await this.base.read(cStart + first.from, first.to - first.from, this.pending.subarray(first.from, first.to));
    } else if (first && last) {
      // Several gaps: one base read of their span beats one small read per gap.
      this.scratch ??= Buffer.alloc(this.clusterSize);
      await this.base.read(cStart + first.from, last.to - first.from, this.scratch.subarray(0, last.to - first.from));
      for (const g of gaps) this.scratch.copy(this.pending, g.from, g.from - first.from, g.to - first.from);
    }
    if (this.pending.equals(this.zeros)) {
      this.guest.push(ci);
      this.host.push(0);
      this.zeroClusters++;
      return;
    }
    if (this.wbLength + this.clusterSize > this.wb.length) await this.flushWriteBehind();
    const hostOffset = this.nextHost++ * this.clusterSize;
    this.pending.copy(this.wb, this.wbLength);
    this.wbLength += this.clusterSize;
    this.guest.push(ci);
    this.host.push(hostOffset);
  }

  /** Byte ranges of the pending cluster (below `limit`) that no chunk has set. */
  private uncoveredRuns(limit: number): { from: number; to: number }[] {
    const runs: { from: number; to: number }[] = [];
    for (let i = 0; i < this.covered.length;) {
      if (this.covered[i]) {
        i++;
        continue;
      }
      let j = i;
      while (j < this.covered.length && !this.covered[j]) j++;
      const from = i * PAGE_SIZE;
      const to = Math.min(j * PAGE_SIZE, limit);
      if (to > from) runs.push({ from, to });
      i = j;
    }
    return runs;
  }

  private async flushWriteBehind(): Promise<void> {
    if (this.wbLength > 0) await this.file.write(this.wb.subarray(0, this.wbLength), this.wbHost);
    this.wbHost += this.wbLength;
    this.wbLength = 0;
  }

  /** Current bytes of [at, at + n) of guest cluster ci into out. */
  private async readCluster(ci: number, at: number, n: number, out: Buffer): Promise<void> {
    const cStart = ci * this.clusterSize;
    if (ci === this.pendingIndex) {
      // Covered chunks come from the cluster being assembled, the others from the base.
      for (let pos = at; pos < at + n;) {
        const chunk = Math.floor(pos / PAGE_SIZE);
        const stop = Math.min(at + n, (chunk + 1) * PAGE_SIZE);
        const dst = out.subarray(pos - at, stop - at);
        if (this.covered[chunk]) this.pending.copy(dst, 0, pos, stop);
        else await this.readBase(cStart + pos, dst);
        pos = stop;
      }
      return;
    }
    const k = this.findGuest(ci);
    if (k < 0) return this.readBase(cStart + at, out);
    const hostOffset = this.host[k] ?? 0;
    if (hostOffset === 0) {
      out.fill(0);
    } else if (hostOffset >= this.wbHost) {
      const from = hostOffset - this.wbHost + at;
      this.wb.copy(out, 0, from, from + n);
    } else {
      await this.file.read(out, 0, n, hostOffset + at);
    }
  }

  /** Base bytes, zero past the virtual size (a shrunken disk hides the base's tail). */
  private async readBase(offset: number, out: Buffer): Promise<void> {
    const n = Math.max(0, Math.min(out.length, this.virtualSize - offset));
    if (n > 0) await this.base.read(offset, n, out.subarray(0, n));
    out.fill(0, n);
  }

  private findGuest(ci: number): number {
    let lo = 0;
    let hi = this.guest.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const g = this.guest[mid] ?? 0;
      if (g === ci) return mid;
      if (g < ci) lo = mid + 1;
      else hi = mid - 1;
    }
    return -1;
  }

  /** Writes L2 tables, L1, refcounts and the header; verifies the header by re-reading it. */
  private async writeMetadata(): Promise<WriterStats> {
    const cs = this.clusterSize;
    const l2Entries = cs / 8;
    const l1Size = l1Entries(this.virtualSize, cs);
    const dataClusters = this.guest.length - this.zeroClusters;

    // L2 tables: one per L1 slot that has any entry, in ascending order (guest is ascending).
    const l1 = Buffer.alloc(Math.ceil((l1Size * 8) / cs) * cs);
    let l2Tables = 0;
    let table: Buffer | null = null;
    let tableSlot = -1;
    const batch = new Batch(this.file, cs);
    const flushTable = async (): Promise<void> => {
      if (!table) return;
      const hostOffset = this.nextHost++ * cs;
      writeEntry(l1, tableSlot * 8, hostOffset, true, false);
      await batch.add(hostOffset, table);
      l2Tables++;
      table = null;
    };
    for (let k = 0; k < this.guest.length; k++) {
      const ci = this.guest[k] ?? 0;
      const slot = Math.floor(ci / l2Entries);
      if (slot !== tableSlot) {
        await flushTable();
        table = Buffer.alloc(cs);
        tableSlot = slot;
      }
      const hostOffset = this.host[k] ?? 0;
      if (table) writeEntry(table, (ci % l2Entries) * 8, hostOffset, hostOffset !== 0, hostOffset === 0);
    }
    await flushTable();

    // L1 table: only its non-zero clusters are written; the final truncate supplies the rest.
    // An empty disk has no L1 table at all (offset 0, as qemu-img create writes it): an
    // allocated but zero-length table would count as a leaked cluster.
    const l1Clusters = l1.length / cs;
    const l1Offset = l1Clusters > 0 ? this.nextHost * cs : 0;
    this.nextHost += l1Clusters;
    for (let c = 0; c < l1Clusters; c++) {
      const part = l1.subarray(c * cs, (c + 1) * cs);
      if (!part.equals(this.zeros)) await batch.add(l1Offset + c * cs, part);
    }

    // Refcounts: every cluster so far plus the refcount structures themselves has refcount 1.
    const { tableClusters, blocks } = refcountLayout(this.nextHost, cs);
    const rtOffset = this.nextHost * cs;
    const firstBlock = this.nextHost + tableClusters;
    const total = firstBlock + blocks;
    const rt = Buffer.alloc(tableClusters * cs);
    for (let b = 0; b < blocks; b++) writeEntry(rt, b * 8, (firstBlock + b) * cs, false, false);
    await batch.add(rtOffset, rt);
    const perBlock = cs / 2;
    const full = Buffer.alloc(cs);
    for (let e = 0; e < perBlock; e++) full.writeUInt16BE(1, e * 2);
    for (let b = 0; b < blocks; b++) {
      const counted = Math.min(perBlock, total - b * perBlock);
      const block = counted === perBlock ? full : Buffer.alloc(cs);
      if (block !== full) for (let e = 0; e < counted; e++) block.writeUInt16BE(1, e * 2);
      await batch.add((firstBlock + b) * cs, block);
    }
    await batch.flush();

    const header: Qcow2Header = {
      clusterBits: this.clusterBits,
      virtualSize: this.virtualSize,
      l1Size,
      l1TableOffset: l1Offset,
      refcountTableOffset: rtOffset,
      refcountTableClusters: tableClusters,
      backingFile: this.backingFile,
      backingFormat: this.backingFormat,
    };
    await this.file.write(encodeHeader(header), 0);
    await this.file.truncate(total * cs);
    await this.verifyHeader(header);
    return {
      path: this.path,
      format: 'qcow2',
      virtual_size: this.virtualSize,
      file_size: total * cs,
      written_bytes: this.writtenBytes,
      zeroed_bytes: this.zeroedBytes,
      data_clusters: dataClusters,
      zero_clusters: this.zeroClusters,
      l2_tables: l2Tables,
    };
  }

  /** Re-reads the header from the file: what qemu will see must be what we meant. */
  private async verifyHeader(expected: Qcow2Header): Promise<void> {
    const buf = Buffer.alloc(this.clusterSize);
    await this.file.read(buf, 0, buf.length, 0);
    const got = decodeHeader(buf);
    for (const key of Object.keys(expected) as (keyof Qcow2Header)[]) {
      if (got[key] !== expected[key]) {
        throw new CloudletError(
          `qcow2 header re-read mismatch in ${key}: wrote ${String(expected[key])}, read ${String(got[key])}`,
        );
      }
    }
  }
}

/** L1 entries needed to map `virtualSize` bytes. */
function l1Entries(virtualSize: number, clusterSize: number): number {
  return Math.ceil(virtualSize / (clusterSize * (clusterSize / 8)));
}

/**
 * Refcount table and block counts for an image of `used` clusters, as a fixed point: the
 * refcount table and blocks are clusters too and need refcounts of their own.
 */
export function refcountLayout(used: number, clusterSize: number): { tableClusters: number; blocks: number } {
  const perBlock = clusterSize / 2; // 16-bit refcounts
  let tableClusters = 1;
  let blocks = 1;
  for (;;) {
    const nextBlocks = Math.ceil((used + tableClusters + blocks) / perBlock);
    const nextTable = Math.max(1, Math.ceil((nextBlocks * 8) / clusterSize));
    if (nextBlocks === blocks && nextTable === tableClusters) return { tableClusters, blocks };
    blocks = nextBlocks;
    tableClusters = nextTable;
  }
}

/** A big-endian 64-bit table entry: host offset, COPIED (bit 63), zero flag (bit 0). */
function writeEntry(buf: Buffer, at: number, hostOffset: number, copied: boolean, zero: boolean): void {
  const hi = Math.floor(hostOffset / 2 ** 32) + (copied ? COPIED_HI : 0);
  const lo = (hostOffset % 2 ** 32) + (zero ? ZERO_FLAG_LO : 0);
  buf.writeUInt32BE(hi >>> 0, at);
  buf.writeUInt32BE(lo >>> 0, at + 4);
}

function emptyHeader(clusterSize: number, virtualSize: number): Qcow2Header {
  return {
    clusterBits: Math.log2(clusterSize),
    virtualSize,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: 0,
    refcountTableClusters: 0,
  };
}

/** Gathers contiguous cluster writes into large ones (metadata is written in ascending order). */
class Batch {
  private readonly buf: Buffer;
  private length = 0;
  private start = 0;

  constructor(
    private readonly file: OutputFile,
    clusterSize: number,
  ) {
    this.buf = Buffer.allocUnsafe(Math.max(WRITE_BEHIND, clusterSize));
  }

  async add(position: number, data: Buffer): Promise<void> {
    if (this.length > 0 && (position !== this.start + this.length || this.length + data.length > this.buf.length)) {
      await this.flush();
    }
    if (data.length > this.buf.length) {
      await this.file.write(data, position);
      return;
    }
    if (this.length === 0) this.start = position;
    data.copy(this.buf, this.length);
    this.length += data.length;
  }

  async flush(): Promise<void> {
    if (this.length > 0) await this.file.write(this.buf.subarray(0, this.length), this.start);
    this.length = 0;
  }
}
