/**
 * Opens a library base as a BaseVm for create/apply/synthesize. Nothing is rehashed: chunk
 * maps come from the library (written at import, when the id was computed from them), RAM
 * blocks are read from their raw files, so opening costs milliseconds whatever the VM size.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ChunkMap } from '../delta/chunk-map.js';
import type { BaseTarget } from '../delta/target.js';
import { openDisk, type DiskSource } from '../image/disk/open-disk.js';
import { openRamFile, type RamFile } from '../image/memory/ram-file.js';
import type { BaseVm } from '../targets/base-vm.js';
import type { BaseSourceSpec } from '../targets/base-sources.js';
import { BLOB_PREFIX, BLOB_START, BLOB_TAIL } from '../targets/blobs.js';
import { CorruptInputError, NotFoundError } from '../util/errors.js';
import { readManifest, type BaseManifest } from './manifest.js';
import { ANCHORS_FILE, baseDir, mapFile } from './paths.js';
import { lockBase } from './locks.js';
import { AnchorIndex } from '../delta/anchors.js';
import { baseIdOf } from '../delta/target.js';
import { confinedFile, specDigest, specFiles } from '../spec/validate.js';

export interface LibraryBase extends BaseVm {
  dir: string;
  manifest: BaseManifest;
}

export async function openLibraryBase(root: string, id: string): Promise<LibraryBase> {
  const dir = baseDir(root, id);
  // Held while the base is open: `base rm` refuses a base in use (locks.ts).
  const unlock = await lockBase(root, id);
  try {
    return await openLocked(root, id, dir, unlock);
  } catch (err) {
    await unlock();
    throw err;
  }
}

async function openLocked(root: string, id: string, dir: string, unlock: () => Promise<void>): Promise<LibraryBase> {
  const manifest = await readManifest(join(dir, 'manifest.json')).catch((err: unknown) => {
    if (err instanceof NotFoundError)
      throw new NotFoundError(`no base ${id} in the library ${root}`, { base: id, library: root });
    throw err;
  });
  if (manifest.id !== id) throw new CorruptInputError(`library entry ${id} holds a manifest for ${manifest.id}`);
  checkManifestId(manifest);
  // The files handed to QEMU must be the base's own: no link out of its directory.
  for (const f of manifest.vm ? specFiles(manifest.vm) : []) await confinedFile(dir, f);
  if (manifest.disk) await confinedFile(dir, manifest.disk.file);
  const closers: Array<() => Promise<void>> = [];
  try {
    const targets: BaseTarget[] = [];
    const blobFiles: { [name: string]: string | undefined } = {
      [BLOB_PREFIX]: manifest.memory?.blobs.prefix,
      [BLOB_START]: manifest.memory?.blobs.start,
      [BLOB_TAIL]: manifest.memory?.blobs.tail,
    };
    for (const t of manifest.targets) {
      if (t.kind === 'blob') {
        const file = blobFiles[t.name];
        if (!file) throw new CorruptInputError(`base ${id}: no file for ${t.name}`);
        const blob = await readFile(join(dir, file));
        targets.push({ name: t.name, kind: t.kind, size: blob.length, blob });
        continue;
      }
      const map = ChunkMap.fromBuffer(await readFile(join(dir, mapFile(t.kind, t.name))), `base ${id} ${t.name} map`);
      let source: DiskSource | RamFile;
      if (t.kind === 'disk') {
        if (!manifest.disk) throw new CorruptInputError(`base ${id}: disk target without disk file`);
        source = await openDisk(join(dir, manifest.disk.file), {
          format: manifest.disk.format,
          name: 'disk',
          check: false,
        });
      } else {
        const file = manifest.memory?.files[t.name];
        if (!file) throw new CorruptInputError(`base ${id}: no file for RAM block ${t.name}`);
        source = await openRamFile(join(dir, file), t.name);
      }
      closers.push(() => source.close());
      if (source.size !== t.size)
        throw new CorruptInputError(`base ${id}: ${t.name} is ${source.size} bytes, manifest says ${t.size}`);
      targets.push({ name: t.name, kind: t.kind, size: t.size, source, map });
    }
    const anchorFile = await readFile(join(dir, ANCHORS_FILE)).catch(() => undefined);
    const mainRamFile = manifest.memory?.files[manifest.memory.main_block];
    if (manifest.memory && !mainRamFile) throw new CorruptInputError(`base ${id}: no file for the main RAM block`);
    return {
      id,
      dir,
      anchors: anchorFile ? AnchorIndex.fromBuffer(anchorFile) : undefined,
      manifest,
      targets,
      infos: manifest.targets,
      machine: manifest.memory?.machine,
      mainBlock: manifest.memory?.main_block,
      ramSectionId: manifest.memory?.ram_section_id,
      diskPath: manifest.disk ? join(dir, manifest.disk.file) : undefined,
      diskFormat: manifest.disk?.format,
      ramFile: mainRamFile ? join(dir, mainRamFile) : undefined,
      sources: targets.map((t): BaseSourceSpec => {
        if (t.kind === 'blob') return { kind: 'blob', name: t.name, size: t.size, bytes: t.blob };
        if (t.kind === 'disk') {
          return {
            kind: 'disk',
            name: t.name,
            size: t.size,
            path: join(dir, manifest.disk!.file),
            format: manifest.disk!.format,
          };
        }
        return { kind: 'ram-file', name: t.name, size: t.size, path: join(dir, manifest.memory!.files[t.name]!) };
      }),
      async close() {
        await Promise.allSettled(closers.map((c) => c()));
        await unlock();
      },
    };
  } catch (err) {
    await Promise.allSettled(closers.map((c) => c()));
    throw err;
  }
}

/**
 * The id must be what the manifest says it covers: the targets and, with a VM spec, the spec
 * and the digests of its files (checked on every open: a spec edited in place is refused).
 */
export function checkManifestId(m: BaseManifest): void {
  const spec = m.vm ? specDigest(m.vm, m.vm_files ?? {}) : undefined;
  if (baseIdOf(m.targets, spec) !== m.id) {
    throw new CorruptInputError(
      `base ${m.id.slice(0, 12)}: its id does not cover its manifest (edited, or imported by an older version: ` +
        're-import it)',
      { base: m.id },
    );
  }
}
