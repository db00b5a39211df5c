/**
 * Importing a base VM into the library from files (a disk image and/or a memory snapshot, and
 * the VM spec a resume must match). Everything is built in <root>/tmp, hashed from the stored
 * copies, and renamed to bases/<id> in one step; an interrupted import leaves nothing behind.
 */
import { chmod, copyFile, mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { sha256Hex } from '../delta/hash.js';
import { baseIdOf, type TargetInfo } from '../delta/target.js';
import * as qemuImg from '../image/disk/qemu-img.js';
import { openDisk } from '../image/disk/open-disk.js';
import { openMemorySnapshot } from '../image/memory/snapshot.js';
import { openRamFile, writeRamFile } from '../image/memory/ram-file.js';
import { BLOB_PREFIX, BLOB_START, BLOB_TAIL } from '../targets/blobs.js';
import { indexTargets } from '../targets/base-vm.js';
import { mainBlockOf } from '../targets/vm-images.js';
import type { NewTarget } from '../delta/target.js';
import type { VmSpec } from '../spec/vm-spec.js';
import { TOOL } from '../util/version.js';
import { NotFoundError, UnsupportedError, UsageError, classifyFsError } from '../util/errors.js';
import { ownerTag } from '../util/owner.js';
import { onCleanup } from '../util/cleanup.js';
import { silent, type Progress } from '../util/progress.js';
import { BASE_NAME, BLOB_FILES, ramFileName, readManifest, type BaseManifest } from './manifest.js';
import {
  parseSpec,
  specDigest,
  storedSpecOf,
  withoutHostSide,
  type SpecFile,
  type SpecFileDigests,
} from '../spec/validate.js';
import { hashFile } from './vm-files.js';
import { ANCHORS_FILE, baseDir, basesDir, mapFile, tmpDir } from './paths.js';

export interface ImportOptions {
  root: string;
  disk?: string;
  diskFormat?: string;
  memory?: string;
  /** How the base VM runs; drive 0 is --disk. Paths in it are copied (kernel, initrd). */
  vm?: VmSpec;
  name?: string;
  qemuVersion?: string;
  progress?: Progress;
}

export interface ImportResult {
  message_type: 'base_import';
  id: string;
  dir: string;
  /** False when the library already held this base (nothing was added). */
  added: boolean;
  manifest: BaseManifest;
}

export async function importBase(opts: ImportOptions): Promise<ImportResult> {
  const progress = opts.progress ?? silent;
  if (!opts.disk && !opts.memory) throw new UsageError('base import needs --disk and/or --memory');
  if (opts.name !== undefined && !BASE_NAME.test(opts.name)) {
    throw new UsageError(`base name ${JSON.stringify(opts.name)}: use letters, digits, '.', '_' or '-' (at most 64)`);
  }
  // The closed list first (spec/validate.ts): an extraArgs or an unknown field is refused before any work.
  const inputVm = opts.vm ? parseSpec(withoutHostSide(opts.vm), 'input') : undefined;
  if (inputVm && (inputVm.drives?.length ?? 0) > 1) {
    throw new UnsupportedError('bases with more than one drive are not supported yet');
  }
  await mkdir(tmpDir(opts.root), { recursive: true });
  await mkdir(basesDir(opts.root), { recursive: true });
  const work = await mkdtemp(join(tmpDir(opts.root), `import-${ownerTag()}-`));
  const unregister = onCleanup(() => rm(work, { recursive: true, force: true }));
  try {
    const targets: TargetInfo[] = [];
    const manifest: Omit<BaseManifest, 'id'> & { id?: string } = {
      format: 'cloudlet-overlay-base',
      version: 1,
      name: opts.name,
      created_at: new Date().toISOString(),
      creator: TOOL,
      targets,
      qemu_version: opts.qemuVersion,
    };

    if (opts.memory) {
      const snap = await openMemorySnapshot(opts.memory);
      try {
        snap.assertComplete();
        await mkdir(join(work, 'stream'));
        await mkdir(join(work, 'ram'));
        const blobs = { ...BLOB_FILES };
        const data: Array<[string, string, Buffer]> = [
          [BLOB_PREFIX, blobs.prefix, await snap.prefixBytes()],
          [BLOB_START, blobs.start, await snap.startSectionBytes()],
          [BLOB_TAIL, blobs.tail, await snap.tail()],
        ];
        for (const [name, file, bytes] of data) {
          await writeFile(join(work, file), bytes);
          targets.push({ name, kind: 'blob', size: bytes.length, digest: sha256Hex(bytes) });
        }
        const files: { [block: string]: string } = {};
        progress.step(
          'writing RAM blocks',
          snap.blocks.reduce((n, b) => n + b.length, 0),
        );
        for (const b of snap.blocks) {
          const file = ramFileName(b.name);
          files[b.name] = file;
          await writeRamFile(snap, b.name, join(work, file));
          progress.advance(b.length);
        }
        progress.done('RAM blocks written');
        const main = mainBlockOf(snap);
        manifest.memory = {
          machine: snap.machineType,
          main_block: main,
          ram_section_id: snap.ramSectionId,
          files,
          blobs,
        };
        checkSpecMatches(inputVm, snap.machineType, snap.blocks.find((b) => b.name === main)?.length ?? 0);
      } finally {
        await snap.close();
      }
    }

    if (opts.disk) {
      // Opened (and qemu-img checked, layer by layer) like every disk input before it is trusted.
      const checked = await openDisk(opts.disk, opts.diskFormat ? { format: opts.diskFormat } : {});
      await checked.close();
      const info = await qemuImg.info(opts.disk, opts.diskFormat ? { format: opts.diskFormat } : {});
      const format: 'raw' | 'qcow2' = info.format === 'raw' ? 'raw' : 'qcow2';
      const file = `disk.${format}`;
      progress.step('copying base disk', info.virtualSize);
      // convert flattens any backing chain and keeps holes: the stored disk stands alone.
      await qemuImg.convert(opts.disk, join(work, file), { srcFormat: info.format, dstFormat: format });
      progress.done('base disk copied');
      manifest.disk = { file, format, virtual_size: info.virtualSize };
    }

    // Hash what was stored (not the originals): the id describes the library's own bytes.
    const stored = await openStored(work, manifest, targets);
    try {
      const indexed = await indexTargets(stored.list, progress);
      targets.splice(0, targets.length, ...indexed.infos);
      await mkdir(join(work, 'maps'));
      for (const t of indexed.targets) {
        if (t.kind !== 'blob') await writeFile(join(work, mapFile(t.kind, t.name)), t.map.toBuffer());
      }
      await writeFile(join(work, ANCHORS_FILE), indexed.anchors.toBuffer());
    } finally {
      await stored.close();
    }

    let digest: string | undefined;
    if (inputVm) {
      // The files the spec names become files of the base, at fixed names, hashed: the id covers them.
      const { spec, sources } = storedSpecOf(inputVm, manifest.disk);
      const files: SpecFileDigests = {};
      for (const [name, from] of Object.entries(sources) as Array<[SpecFile, string]>) {
        await copyFile(from, join(work, name)).catch((err: unknown) => {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === 'ENOSPC' || code === 'EDQUOT') throw classifyFsError(err, join(work, name));
          throw new NotFoundError(`the VM spec's ${name} ${from} cannot be read: ${(err as Error).message}`, {
            path: from,
          });
        });
        files[name] = await hashFile(join(work, name));
      }
      manifest.vm = spec;
      if (Object.keys(files).length > 0) manifest.vm_files = files;
      digest = specDigest(spec, files);
    }

    const id = baseIdOf(targets, digest);
    const full: BaseManifest = { ...manifest, id };
    await writeFile(join(work, 'manifest.json'), JSON.stringify(full, null, 2) + '\n');
    await freeze(work, full);

    const dest = baseDir(opts.root, id);
    try {
      await rename(work, dest);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOTEMPTY' || code === 'EEXIST') {
        await rm(work, { recursive: true, force: true });
        return {
          message_type: 'base_import',
          id,
          dir: dest,
          added: false,
          manifest: await readManifest(join(dest, 'manifest.json')),
        };
      }
      throw err;
    }
    return { message_type: 'base_import', id, dir: dest, added: true, manifest: full };
  } catch (err) {
    progress.fail('import failed');
    await rm(work, { recursive: true, force: true });
    throw err;
  } finally {
    unregister();
  }
}

/** A VM spec that cannot resume the snapshot is refused now, not at the first synthesis. */
function checkSpecMatches(vm: VmSpec | undefined, machine: string, mainBytes: number): void {
  if (!vm) return;
  if (vm.machine !== machine) {
    throw new UsageError(`the VM spec says machine ${vm.machine} but the memory snapshot is from ${machine}`);
  }
  if (vm.memoryMiB * 2 ** 20 !== mainBytes) {
    throw new UsageError(
      `the VM spec says ${vm.memoryMiB} MiB of RAM but the snapshot's main RAM block holds ${mainBytes / 2 ** 20} MiB`,
    );
  }
}

/** The stored copies as targets in overlay order: the blobs already listed, the disk, the RAM blocks. */
async function openStored(
  work: string,
  m: Omit<BaseManifest, 'id'>,
  blobInfos: readonly TargetInfo[],
): Promise<{ list: NewTarget[]; close(): Promise<void> }> {
  const closers: Array<() => Promise<void>> = [];
  const close = async (): Promise<void> => {
    for (const c of closers) await c();
  };
  try {
    const list: NewTarget[] = [];
    const blobFiles: { [name: string]: string | undefined } = {
      [BLOB_PREFIX]: m.memory?.blobs.prefix,
      [BLOB_START]: m.memory?.blobs.start,
      [BLOB_TAIL]: m.memory?.blobs.tail,
    };
    for (const b of blobInfos) {
      const file = blobFiles[b.name];
      if (!file) throw new Error(`base import: no stored file for ${b.name}`);
      list.push({ name: b.name, kind: 'blob', blob: await readFile(join(work, file)) });
    }
    if (m.disk) {
      const d = await openDisk(join(work, m.disk.file), { format: m.disk.format, check: false });
      closers.push(() => d.close());
      list.push({ name: 'disk', kind: 'disk', source: d });
    }
    for (const [block, file] of Object.entries(m.memory?.files ?? {})) {
      const f = await openRamFile(join(work, file), block);
      closers.push(() => f.close());
      list.push({ name: block, kind: 'ram', source: f });
    }
    return { list, close };
  } catch (err) {
    await close();
    throw err;
  }
}

/**
 * Base files never change after import: read-only, except RAM files, which QEMU 7.2 opens
 * read-write even when it maps them private (share=off) and never writes.
 */
async function freeze(dir: string, m: Omit<BaseManifest, 'id'>): Promise<void> {
  const ram = new Set(Object.values(m.memory?.files ?? {}));
  const files = [
    'manifest.json',
    ...Object.values(m.memory?.blobs ?? {}),
    ...(m.disk ? [m.disk.file] : []),
    ...Object.keys(m.vm_files ?? {}),
  ];
  for (const f of files) await chmod(join(dir, f), 0o444);
  for (const f of ram) await chmod(join(dir, f), 0o644);
}
