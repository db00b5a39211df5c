/**
 * apply: rebuild a customized VM's disk and memory from a base and an overlay. The overlay is
 * opened and checked (header, footer, index, base id) before anything is written; all outputs
 * are written into a staging directory inside the output directory and moved into place only
 * after every target has been proven against the overlay's digests. An error or interrupt
 * leaves the output directory as it was.
 */
import { mkdir, rename, rm, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { AssemblyOutput } from '../delta/assemble.js';
import type { OverlayHeader } from '../overlay/format.js';
import { DiskChunks, RawRamFile, SharedStream, StreamBlock } from '../pipeline/outputs.js';
import { rebuild } from '../pipeline/rebuild.js';
import { ScratchStore } from '../image/scratch-store.js';
import { Qcow2Writer } from '../image/disk/qcow2-writer.js';
import { RawWriter } from '../image/disk/raw-writer.js';
import type { DiskWriter } from '../image/disk/writer.js';
import { MigrationStreamWriter } from '../image/memory/writer.js';
import { BusyError, UnsupportedError, UsageError, withPath } from '../util/errors.js';
import type { TrustedKey } from '../util/sign.js';
import { checkOverlayFitsBase } from './overlay-fit.js';
import { onCleanup } from '../util/cleanup.js';
import { stagingDir, writeFileAtomic, syncDir } from '../util/atomic.js';
import { silent, Timings, type Progress } from '../util/progress.js';
import { safeName } from '../util/safe-name.js';
import type { BaseVm } from '../targets/base-vm.js';
import { BLOB_PREFIX, BLOB_START, BLOB_TAIL, STREAM_BLOBS } from '../targets/blobs.js';
import { withBase, type BaseRef } from './base-ref.js';
import { openOverlayInput, overlayInput, type OpenedOverlay, type OverlayInput } from './overlay-input.js';

export type DiskFormat = 'qcow2' | 'raw';
export type MemoryFormat = 'sparse' | 'stream' | 'raw';

export interface ApplyOptions {
  /** A path or URL, or any overlay input (an upload). */
  overlay: string | OverlayInput;
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
  /** Decode threads (default: every core; 0: this thread only). */
  threads?: number;
  /** fsync outputs (default true; a synthesized VM's instance files are scratch). */
  durable?: boolean;
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

/** The overlay fits the base: the id, the base targets it lists, its RAM blocks (overlay-fit.ts). */
export function checkBase(header: OverlayHeader, base: BaseVm): void {
  checkOverlayFitsBase(header, base);
}

export async function applyOverlay(opts: ApplyOptions): Promise<ApplyResult> {
  const progress = opts.progress ?? silent;
  // A full disk (or a missing directory) is reported naming the output, not as a bare errno.
  return withPath(resolve(opts.outDir), () => applyWithBase(opts, progress));
}

function applyWithBase(opts: ApplyOptions, progress: Progress): Promise<ApplyResult> {
  return withBase(opts.base, progress, async (base) => {
    const timings = new Timings();
    const input = typeof opts.overlay === 'string' ? overlayInput(opts.overlay) : opts.overlay;
    // The pipeline reports the overlay bytes it consumes: a download itself stays silent.
    const opened = await timings.time('open', () => openOverlayInput(input, silent, { trust: opts.trust }));
    try {
      return await applyWith(opened, base, opts, progress, timings);
    } finally {
      await opened.close();
    }
  });
}

/**
 * The overlay's RAM blocks must be the base's (same names and sizes): they come from a resume
 * of it, and it bounds the work a header could otherwise ask for.
 */
export function checkRamLayout(header: OverlayHeader, base: BaseVm): void {
  for (const t of header.targets) {
    if (t.kind !== 'ram') continue;
    const b = base.targets.find((x) => x.kind === 'ram' && x.name === t.name);
    if (!b || b.size !== t.size) {
      throw new UnsupportedError(
        `the overlay's RAM block ${t.name} (${t.size} bytes) is not one of the base's` +
          ' (a customized VM must come from a resume of the base snapshot)',
        { block: t.name },
      );
    }
  }
}

async function applyWith(
  opened: OpenedOverlay,
  base: BaseVm,
  opts: ApplyOptions,
  progress: Progress,
  timings: Timings,
): Promise<ApplyResult> {
  const header = opened.header;
  checkBase(header, base);
  checkRamLayout(header, base);
  const durable = opts.durable ?? true;

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
    const outputs: Array<AssemblyOutput | undefined> = header.targets.map(() => undefined);
    let stream: SharedStream | undefined;
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
              durable,
            })
          : await RawWriter.create(path, { virtualSize: diskTarget.size, base: baseDisk.source, durable });
      aborts.push(() => writer.abort());
      outputs[header.targets.indexOf(diskTarget)] = new DiskChunks(writer, diskTarget.size);
    }
    const memory = mem;
    if (ramTargets.length > 0 && !memory) throw new UsageError('overlay has RAM blocks but no memory description');
    if (memory && memoryFormat === 'raw') {
      await mkdir(join(staging, names.memory));
      for (const t of ramTargets) {
        const out = new RawRamFile(join(staging, names.memory, `${safeName(t.name)}.raw`), t.size, durable);
        aborts.push(() => out.abort());
        outputs[header.targets.indexOf(t)] = out;
      }
    }

    const store = new ScratchStore(join(staging, '.rebuilt'));
    progress.step('rebuilding VM from overlay', opened.size);
    const result = await timings.time('rebuild', async () => {
      try {
        return await rebuild({
          reader: opened.reader,
          header,
          base: base.targets,
          baseSources: base.sources,
          store,
          threads: opts.threads,
          onBytes: (n) => progress.advance(n),
          outputs: (blob) => {
            if (memory && memoryFormat !== 'raw') {
              const writer = new MigrationStreamWriter(join(staging, names.memory), { durable });
              aborts.push(() => writer.abort());
              stream = new SharedStream(writer, blob, memory.ramSectionId, {
                prefix: BLOB_PREFIX,
                start: BLOB_START,
                tail: BLOB_TAIL,
              });
              for (const t of ramTargets) {
                const every = memoryFormat === 'stream' || t.name !== memory.mainBlock;
                outputs[header.targets.indexOf(t)] = new StreamBlock(stream, t.name, every);
              }
            }
            return outputs;
          },
        });
      } finally {
        await store.close();
      }
    });
    opened.verifyWhole();
    await stream?.end();
    if (memoryFormat === 'raw' && ramTargets.length > 0) {
      for (const name of STREAM_BLOBS) {
        const b = result.blobs.get(name);
        if (b) await writeFileAtomic(join(staging, names.memory, name), b, { durable });
      }
    }
    progress.done('rebuilt and verified');

    const manifest: ApplyManifest = {
      message_type: 'synthesis',
      overlay: opened.name,
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
    await writeFileAtomic(join(staging, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n', { durable });

    // Everything is proven: move into place, manifest last so it only ever describes real files.
    await timings.time('commit', async () => {
      for (const n of finals) {
        if (opts.force) await rm(join(outDir, n), { recursive: true, force: true });
        await rename(join(staging, n), join(outDir, n));
      }
      if (durable) await syncDir(outDir);
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
