/**
 * apply: rebuild a customized VM's disk and memory from a base and an overlay. The overlay is
 * opened and checked (header, footer, index, base id) before anything is written; all outputs
 * are written into a staging directory inside the output directory and moved into place only
 * after every target has been proven against the overlay's digests. An error or interrupt
 * leaves the output directory as it was.
 */
import { mkdir, rename, rm, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Patcher, type TargetOutput } from '../delta/patch.js';
import { initXdelta3 } from '../delta/xdelta3.js';
import { OverlayReader } from '../overlay/reader.js';
import type { OverlayHeader } from '../overlay/format.js';
import { Qcow2Writer } from '../image/disk/qcow2-writer.js';
import { RawWriter } from '../image/disk/raw-writer.js';
import type { DiskWriter } from '../image/disk/writer.js';
import { MigrationStreamWriter } from '../image/memory/writer.js';
import { BusyError, UsageError, withPath } from '../util/errors.js';
import type { TrustedKey } from '../util/sign.js';
import { checkOverlayFitsBase } from './overlay-fit.js';
import { onCleanup } from '../util/cleanup.js';
import { stagingDir, writeFileAtomic, syncDir } from '../util/atomic.js';
import { silent, Timings, type Progress } from '../util/progress.js';
import { safeName } from '../util/safe-name.js';
import type { BaseVm } from '../targets/base-vm.js';
import { BLOB_PREFIX, BLOB_START, BLOB_TAIL, STREAM_BLOBS } from '../targets/blobs.js';
import { withBase, type BaseRef } from './base-ref.js';
import { DiskOutput, RawFileOutput, SharedStream, StreamBlockOutput } from './outputs.js';

export type DiskFormat = 'qcow2' | 'raw';
export type MemoryFormat = 'sparse' | 'stream' | 'raw';

export interface ApplyOptions {
  overlay: string | OverlayReader;
  /** An open base, or one to open (and close) for this call. */
  base: BaseVm | BaseRef;
  outDir: string;
  diskFormat?: DiskFormat;
  /** Default: sparse when the base has a RAM file, else stream. */
  memoryFormat?: MemoryFormat;
  /** The base's main RAM block as a raw file (for sparse memory); default: the base's own. */
  baseRamFile?: string;
  /** qcow2 cluster size. */
  clusterSize?: number;
  /** Replace outputs that already exist. */
  force?: boolean;
  progress?: Progress;
  /** Trusted keys: refuse an unsigned or wrongly signed overlay (overlay/signature.ts). */
  trust?: readonly TrustedKey[];
}

/** The manifest.json apply writes beside the rebuilt VM: its files and how to resume them. */
export interface ApplyManifest {
  message_type: 'synthesis';
  overlay: string;
  base_id: string;
  created_at: string;
  disk?: { path: string; format: DiskFormat; size: number; backing?: { path: string; format: string } };
  memory?: {
    path: string;
    format: MemoryFormat;
    machine: string;
    main_block: string;
    main_block_size: number;
    /** Sparse streams resume on top of this file mapped share=off. */
    base_ram_file?: string;
  };
}

export interface ApplyResult {
  message_type: 'apply';
  out_dir: string;
  manifest: ApplyManifest;
  changed_chunks: { [target: string]: number };
  timings_ms: { [phase: string]: number };
}

export function checkBase(header: OverlayHeader, base: BaseVm): void {
  checkOverlayFitsBase(header, base);
}

export async function applyOverlay(opts: ApplyOptions): Promise<ApplyResult> {
  const progress = opts.progress ?? silent;
  return withPath(resolve(opts.outDir), () => applyWithBase(opts, progress));
}

function applyWithBase(opts: ApplyOptions, progress: Progress): Promise<ApplyResult> {
  return withBase(opts.base, progress, async (base) => {
    const timings = new Timings();
    const given = opts.overlay;
    const reader =
      typeof given === 'string'
        ? await timings.time('open', () => OverlayReader.open(given, { trust: opts.trust }))
        : given;
    try {
      return await applyWith(reader, base, opts, progress, timings);
    } finally {
      if (typeof given === 'string') await reader.close();
    }
  });
}

async function applyWith(
  reader: OverlayReader,
  base: BaseVm,
  opts: ApplyOptions,
  progress: Progress,
  timings: Timings,
): Promise<ApplyResult> {
  const header = reader.header;
  checkBase(header, base);
  await initXdelta3();

  const outDir = resolve(opts.outDir);
  const diskTarget = header.targets.find((t) => t.kind === 'disk');
  const ramTargets = header.targets.filter((t) => t.kind === 'ram');
  const diskFormat = opts.diskFormat ?? 'qcow2';
  const baseRamFile = opts.baseRamFile ?? base.ramFile;
  let memoryFormat = opts.memoryFormat ?? (baseRamFile ? 'sparse' : 'stream');
  const mem = header.memory;
  if (ramTargets.length === 0) memoryFormat = opts.memoryFormat ?? 'stream';
  const mainSize = ramTargets.find((t) => t.name === mem?.mainBlock)?.size ?? 0;
  if (ramTargets.length > 0 && memoryFormat === 'sparse') {
    if (!baseRamFile) {
      throw new UsageError(
        'sparse memory resumes on top of the base RAM file: ' +
          'use a library base or --base-ram FILE (or --memory-format stream)',
      );
    }
    const st = await stat(baseRamFile).catch(() => undefined);
    if (!st || st.size !== mainSize) {
      throw new UsageError(
        `base RAM file ${baseRamFile} is missing or not ${mainSize} bytes (the ${mem?.mainBlock} block)`,
      );
    }
  }
  const baseDisk = base.targets.find((t) => t.kind === 'disk');
  const baseDiskFile =
    base.diskPath && base.diskFormat ? { path: resolve(base.diskPath), format: base.diskFormat } : undefined;
  if (diskTarget && (!baseDisk || baseDisk.kind !== 'disk' || !baseDiskFile)) {
    throw new UsageError('the overlay rebuilds a disk: the base needs its disk');
  }

  const names = {
    disk: diskFormat === 'qcow2' ? 'disk.qcow2' : 'disk.raw',
    memory: memoryFormat === 'sparse' ? 'memory.sparse' : memoryFormat === 'stream' ? 'memory.stream' : 'memory',
  };
  await mkdir(outDir, { recursive: true });
  const finals = [
    diskTarget ? names.disk : undefined,
    ramTargets.length ? names.memory : undefined,
    'manifest.json',
  ].filter((n): n is string => n !== undefined);
  if (!opts.force) {
    for (const n of finals) {
      if (await stat(join(outDir, n)).catch(() => undefined)) {
        throw new BusyError(`${join(outDir, n)} already exists (use --force to replace it)`, { path: join(outDir, n) });
      }
    }
  }

  const staging = await stagingDir(outDir, '.staging-');
  const unregister = onCleanup(() => rm(staging, { recursive: true, force: true }));
  const aborts: Array<() => Promise<void>> = [];
  try {
    const outputs: Array<TargetOutput | undefined> = header.targets.map(() => undefined);
    // The stream output needs the blobs the patcher rebuilds first (they precede every page).
    const made: { patcher?: Patcher } = {};
    const blob = (name: string): Buffer => {
      if (!made.patcher) throw new Error('apply: a stream blob was asked for before the patcher exists');
      return made.patcher.blob(name);
    };
    if (diskTarget && baseDisk?.kind === 'disk' && baseDiskFile) {
      const path = join(staging, names.disk);
      const writer: DiskWriter =
        diskFormat === 'qcow2'
          ? await Qcow2Writer.create(path, {
              virtualSize: diskTarget.size,
              backingFile: baseDiskFile.path,
              backingFormat: baseDiskFile.format,
              base: baseDisk.source,
              clusterSize: opts.clusterSize,
            })
          : await RawWriter.create(path, { virtualSize: diskTarget.size, base: baseDisk.source });
      aborts.push(() => writer.abort());
      outputs[header.targets.indexOf(diskTarget)] = new DiskOutput(writer, diskTarget.size);
    }
    if (ramTargets.length > 0) {
      if (!mem) throw new UsageError('overlay has RAM blocks but no memory description');
      if (memoryFormat === 'raw') {
        await mkdir(join(staging, names.memory));
        for (const t of ramTargets) {
          const out = new RawFileOutput(join(staging, names.memory, `${safeName(t.name)}.raw`), t.size);
          aborts.push(() => out.abort());
          outputs[header.targets.indexOf(t)] = out;
        }
      } else {
        const writer = new MigrationStreamWriter(join(staging, names.memory));
        aborts.push(() => writer.abort());
        const shared = new SharedStream(writer, ramTargets.length, blob, mem.ramSectionId, {
          prefix: BLOB_PREFIX,
          start: BLOB_START,
          tail: BLOB_TAIL,
        });
        for (const t of ramTargets) {
          const all = memoryFormat === 'stream' || t.name !== mem.mainBlock;
          outputs[header.targets.indexOf(t)] = new StreamBlockOutput(shared, t.name, all);
        }
      }
    }

    const patcher = new Patcher(base.targets, header.targets, outputs, reader);
    made.patcher = patcher;
    progress.step('rebuilding VM from overlay', reader.fileSize);
    let seg = -1;
    const result = await timings.time('rebuild', async () => {
      for await (const at of reader.records()) {
        if (at.segment !== seg) {
          seg = at.segment;
          progress.advance(reader.index.segments[seg]?.length ?? 0);
        }
        await patcher.add(at);
      }
      return patcher.finish();
    });
    if (memoryFormat === 'raw' && ramTargets.length > 0) {
      for (const name of STREAM_BLOBS) {
        await writeFileAtomic(join(staging, names.memory, name), patcher.blob(name));
      }
    }
    progress.done('rebuilt and verified');

    const manifest: ApplyManifest = {
      message_type: 'synthesis',
      overlay: typeof opts.overlay === 'string' ? resolve(opts.overlay) : resolve(reader.path),
      base_id: base.id,
      created_at: new Date().toISOString(),
    };
    if (diskTarget) {
      manifest.disk = { path: names.disk, format: diskFormat, size: diskTarget.size };
      if (diskFormat === 'qcow2' && baseDiskFile) manifest.disk.backing = baseDiskFile;
    }
    if (ramTargets.length > 0 && mem) {
      manifest.memory = {
        path: names.memory,
        format: memoryFormat,
        machine: mem.machine,
        main_block: mem.mainBlock,
        main_block_size: mainSize,
      };
      if (memoryFormat === 'sparse' && baseRamFile) manifest.memory.base_ram_file = resolve(baseRamFile);
    }
    await writeFileAtomic(join(staging, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');

    // Everything is proven: move into place, manifest last so it only ever describes real files.
    await timings.time('commit', async () => {
      for (const n of finals) {
        if (opts.force) await rm(join(outDir, n), { recursive: true, force: true });
        await rename(join(staging, n), join(outDir, n));
      }
      await syncDir(outDir);
    });
    return {
      message_type: 'apply',
      out_dir: outDir,
      manifest,
      changed_chunks: result.changedChunks,
      timings_ms: { ...timings.phases, total: timings.total() },
    };
  } catch (err) {
    progress.fail('apply failed');
    for (const a of aborts) await a().catch(() => undefined);
    throw err;
  } finally {
    await rm(staging, { recursive: true, force: true });
    unregister();
  }
}
