/**
 * create: diff a customized VM (disk and/or memory snapshot) against a base VM into one
 * overlay file. Everything is opened and checked before the output is created; the output
 * appears atomically only when complete.
 */
import { realpath } from 'node:fs/promises';
import { anchorBase, indexBase } from '../delta/base-index.js';
import { availableParallelism } from 'node:os';
import { createPool } from '../pipeline/create-pool.js';
import { SharedHashes } from '../delta/shared-hashes.js';
import { CHUNK_SIZE } from '../delta/chunk.js';
import { defaultDiffOptions, diff, type DiffOptions } from '../delta/diff.js';
import { initXdelta3 } from '../delta/xdelta3.js';
import { OverlayWriter } from '../overlay/writer.js';
import { OverlayReader } from '../overlay/reader.js';
import { VERSION_MAJOR, VERSION_MINOR, type OverlayHeader } from '../overlay/format.js';
import type { DiffStats } from '../delta/stats.js';
import { targetSize, type NewChunkedTarget, type TargetInfo } from '../delta/target.js';
import { UsageError, withPath } from '../util/errors.js';
import { backingChain } from '../image/disk/open-disk.js';
import { freeChunkRanges, freeSpace, type FreeSpaceResult } from '../image/fs/free-space.js';
import { silent, Timings, type Progress } from '../util/progress.js';
import type { BaseVm } from '../targets/base-vm.js';
import { openVmImages, vmTargets, mainBlockOf, type TargetOrder } from '../targets/vm-images.js';
import { TOOL } from '../util/version.js';
import { checkOutputPath } from '../util/atomic.js';
import { publicOf, type SigningKey } from '../util/sign.js';
import { withBase, type BaseRef } from './base-ref.js';

export interface CreateOptions {
  /** An open base, or one to open (and close) for this call. */
  base: BaseVm | BaseRef;
  disk?: string;
  diskFormat?: string;
  memory?: string;
  output: string;
  /** zstd level of the segments. */
  level?: number;
  tmpDir?: string;
  progress?: Progress;
  /** Switch encoders off (benchmarks). */
  encoders?: Partial<DiffOptions>;
  /** Sign the overlay's header (format 1.1 signature) with this key. */
  sign?: SigningKey;
  /** Replace an existing output file (else BusyError before any work). */
  force?: boolean;
  /** Default memory-first: what a synthesizing QEMU loads first comes first. */
  order?: TargetOrder;
  /** Threads (default: every core); the overlay's bytes are the same whatever the number. */
  threads?: number;
  /**
   * Leave out changed disk chunks that lie wholly in blocks the guest's file systems mark free
   * (rebuilt as the base's content there, or zero): `off` (the default: the rebuilt disk is the
   * customized one, byte for byte), `auto` (only file systems whose on-disk bitmaps can be
   * trusted — unmounted, frozen or read-only at the snapshot: docs/free-blocks.md; others stay
   * exact), `ext4` (as auto, but an error when no trusted ext2/3/4 is found).
   */
  freeBlocks?: FreeBlocksMode;
}

export type FreeBlocksMode = 'off' | 'auto' | 'ext4';

/** One file system of a disk image, and whether its free blocks can be trusted (image/fs). */
export interface FileSystemSummary {
  type: string;
  /** Partition number; null for a file system on the whole disk. */
  partition: number | null;
  trusted: boolean;
  reason?: string;
  free_bytes: number;
}

export function summarizeFileSystems(found: FreeSpaceResult): FileSystemSummary[] {
  return found.filesystems.map((f) => ({
    type: f.type,
    partition: f.partition?.number ?? null,
    trusted: f.verdict.trusted,
    ...(f.verdict.trusted ? {} : { reason: f.verdict.reason }),
    free_bytes: f.freeBytes,
  }));
}

/** What --free-blocks found on the customized disk. */
export interface FreeBlocksReport {
  mode: FreeBlocksMode;
  file_systems: FileSystemSummary[];
  /** Free bytes of the trusted file systems (whole 4 KiB chunks). */
  free_bytes: number;
  /** Chunks that would have been read and compared, left out as free. */
  chunks_left_out: number;
  notes: string[];
}

export interface CreateResult {
  message_type: 'create';
  path: string;
  size: number;
  base_id: string;
  targets: TargetInfo[];
  stats: DiffStats;
  /** With --free-blocks auto|ext4. */
  free_blocks?: FreeBlocksReport;
  timings_ms: { [phase: string]: number };
}

export const DEFAULT_LEVEL = 9;

export async function createOverlay(opts: CreateOptions): Promise<CreateResult> {
  const progress = opts.progress ?? silent;
  // A full disk (or a missing directory) is reported naming the output, not as a bare errno.
  return withPath(opts.output, () => withBase(opts.base, progress, (base) => createWith(base, opts, progress)));
}

async function createWith(base: BaseVm, opts: CreateOptions, progress: Progress): Promise<CreateResult> {
  const timings = new Timings();
  const level = opts.level ?? DEFAULT_LEVEL;
  if (!Number.isInteger(level) || level < 1 || level > 22)
    throw new UsageError(`compression level must be 1..22, not ${level}`);
  await checkOutputPath(opts.output, opts.force ?? false);
  if (opts.memory && !base.targets.some((t) => t.kind === 'ram')) {
    throw new UsageError('the customized VM has a memory snapshot but the base has none: give the base memory too');
  }
  if (opts.disk && !base.targets.some((t) => t.kind === 'disk')) {
    throw new UsageError('the customized VM has a disk but the base has none: give the base disk too');
  }
  const freeMode = opts.freeBlocks ?? 'off';
  if (!['off', 'auto', 'ext4'].includes(freeMode)) throw new UsageError(`--free-blocks must be off, auto or ext4`);
  await initXdelta3();
  const vm = await timings.time('open', () =>
    openVmImages({ disk: opts.disk, diskFormat: opts.diskFormat, memory: opts.memory, tmpDir: opts.tmpDir }),
  );
  try {
    if (vm.memory && base.machine && vm.memory.machineType !== base.machine) {
      throw new UsageError(
        `the customized memory snapshot is from machine ${vm.memory.machineType}, the base from ${base.machine}: ` +
          'take the customized snapshot from a resume of the base snapshot',
      );
    }
    const targets = vmTargets(vm, opts.order ?? 'memory-first');
    checkRamBlocks(targets, base);
    const header: OverlayHeader = {
      format: 'cloudlet-overlay',
      version: [VERSION_MAJOR, VERSION_MINOR],
      createdAt: new Date().toISOString(),
      creator: TOOL,
      chunkSize: CHUNK_SIZE,
      base: { id: base.id, targets: base.infos },
      targets: targets.map((t) => ({ name: t.name, kind: t.kind, size: targetSize(t), digest: '' })),
      compression: { codec: 'zstd', level },
    };
    if (vm.memory) {
      header.memory = {
        machine: vm.memory.machineType,
        mainBlock: mainBlockOf(vm.memory),
        ramSectionId: vm.memory.ramSectionId,
      };
    }
    // A customized qcow2 sitting directly on the base disk: only its own clusters can differ.
    const diskTarget = targets.find((t): t is NewChunkedTarget => t.kind === 'disk');
    const baseDiskPath = base.diskPath;
    if (diskTarget && vm.disk && baseDiskPath && vm.disk.format !== 'raw') {
      const [backing] = await backingChain(vm.disk.path, { format: vm.disk.format });
      const basePath = await realpath(baseDiskPath).catch(() => baseDiskPath);
      const first = backing ? await realpath(backing.filename).catch(() => backing.filename) : undefined;
      if (backing && first === basePath && backing.format === base.diskFormat && backing.virtualSize === vm.disk.size) {
        diskTarget.changedHint = await vm.disk.ownExtents();
      }
    }

    let freeReport: FreeBlocksReport | undefined;
    if (diskTarget && vm.disk && freeMode !== 'off') {
      const disk = vm.disk;
      const found = await timings.time('free_blocks', () => freeSpace(disk));
      const ranges = freeChunkRanges(found.free, CHUNK_SIZE);
      freeReport = {
        mode: freeMode,
        file_systems: summarizeFileSystems(found),
        free_bytes: ranges.reduce((n, r) => n + r.count, 0) * CHUNK_SIZE,
        chunks_left_out: 0,
        notes: found.notes,
      };
      if (freeMode === 'ext4' && !found.filesystems.some((f) => f.verdict.trusted)) {
        const why = found.filesystems.map((f) => (f.verdict.trusted ? '' : `${f.type}: ${f.verdict.reason}`));
        throw new UsageError(
          `--free-blocks ext4: no trusted ext2/3/4 file system on the customized disk` +
            `${why.length ? ` (${why.join('; ')})` : ''}. Its bitmaps are current only when it was unmounted, ` +
            'frozen or read-only at the snapshot: snapshot --freeze (or --trim, then create without --free-blocks)',
        );
      }
      if (ranges.length > 0) diskTarget.dontCare = ranges;
    }

    if (!base.anchors) {
      // A library base from before anchors (or with a damaged index): build it now.
      progress.step('indexing base content anchors');
      base.anchors = await anchorBase(base.targets, (n) => progress.advance(n));
      progress.done('base anchors indexed');
    }
    const total = targets.reduce((n, t) => n + targetSize(t), 0);
    const baseIndex = indexBase(base.targets);
    const ladder = { ...defaultDiffOptions, ...opts.encoders };
    // threads 1: everything on this thread; more: proposals and segment compression on workers.
    const threads = opts.threads ?? availableParallelism();
    const known = new SharedHashes(targets.reduce((n, t) => n + (t.kind === 'blob' ? 0 : t.source.size / 4096), 0));
    const pool =
      threads > 1 ? await createPool(threads, base.sources, baseIndex, base.anchors, known, ladder) : undefined;
    const writer = await OverlayWriter.create(opts.output, header, {
      ...(pool ? { compress: pool.compress, depth: threads + 1 } : {}),
      sign: opts.sign,
      force: opts.force,
    });
    let result;
    try {
      progress.step('creating overlay', total);
      const diffResult = await timings.time('diff', () =>
        diff(base.targets, baseIndex, targets, writer, {
          baseAnchors: base.anchors,
          ...opts.encoders,
          onProgress: (n) => progress.advance(n),
          proposer: pool?.propose,
          depth: pool ? threads * 2 : 1,
          known,
        }),
      );
      result = await timings.time('finish', () => writer.finish(diffResult.targets, diffResult.stats));
      if (freeReport) freeReport.chunks_left_out = diffResult.stats.targets['disk']?.dontCareChunks ?? 0;
      progress.done('overlay created');
      // Re-read what was written: header, footer and index must parse (restic does the same).
      const check = await OverlayReader.open(opts.output, { trust: opts.sign ? [publicOf(opts.sign)] : [] });
      await check.close();
      return {
        message_type: 'create',
        path: opts.output,
        size: result.size,
        base_id: base.id,
        targets: result.header.targets,
        stats: diffResult.stats,
        ...(freeReport ? { free_blocks: freeReport } : {}),
        timings_ms: { ...timings.phases, total: timings.total() },
      };
    } catch (err) {
      progress.fail('create failed');
      await writer.abort();
      throw err;
    } finally {
      await pool?.close();
    }
  } finally {
    await vm.close();
  }
}

/**
 * A memory snapshot resumes only on the base's machine: its RAM blocks must be the base's, by
 * name and at most as large (readers refuse anything else, so refuse it here with the reason).
 */
function checkRamBlocks(targets: ReturnType<typeof vmTargets>, base: BaseVm): void {
  for (const t of targets) {
    if (t.kind !== 'ram') continue;
    const b = base.targets.find((x) => x.kind === 'ram' && x.name === t.name);
    if (!b || t.source.size > b.size) {
      throw new UsageError(
        `the customized memory snapshot has RAM block ${t.name} of ${t.source.size} bytes, ` +
          (b ? `the base's is ${b.size} bytes` : 'the base has no such block') +
          ': take the customized snapshot from a resume of the base snapshot',
      );
    }
  }
}
