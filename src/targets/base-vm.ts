/**
 * A base VM ready for diff and patch: its targets with chunk maps (and blobs), their digests,
 * its id and content anchors, and what a resume needs (machine, main RAM block, disk). The base
 * library opens one from its stored indexes (base/open.ts); a base given as files is indexed
 * here, by hashing every chunk.
 */
import type { AnchorIndex } from '../delta/anchors.js';
import { anchorBase } from '../delta/base-index.js';
import { ChunkMap } from '../delta/chunk-map.js';
import { sha256Hex } from '../delta/hash.js';
import { baseIdOf, type BaseTarget, type NewTarget, type TargetInfo } from '../delta/target.js';
import { CorruptInputError } from '../util/errors.js';
import type { Progress } from '../util/progress.js';
import { mainBlockOf, vmTargets, type VmImages } from './vm-images.js';
import type { BaseSourceSpec } from './base-sources.js';

export interface BaseVm {
  id: string;
  targets: BaseTarget[];
  infos: TargetInfo[];
  machine?: string;
  mainBlock?: string;
  ramSectionId?: number;
  diskPath?: string;
  diskFormat?: string;
  /** The main RAM block as a raw page-aligned file, when the base library has one. */
  ramFile?: string;
  /** Content anchors of the base (finds data that moved by a non-multiple of 4 KiB). */
  anchors?: AnchorIndex;
  /** Where each target's bytes are, for worker threads that open the base themselves. */
  sources: BaseSourceSpec[];
  close(): Promise<void>;
}

/** A blob target of the base (the stream pieces); CorruptInputError when the base lacks it. */
export function baseBlob(base: BaseVm, name: string): Buffer {
  for (const t of base.targets) if (t.kind === 'blob' && t.name === name) return t.blob;
  throw new CorruptInputError(`base ${base.id.slice(0, 12)} has no ${name}`, { base: base.id, target: name });
}

/** Base targets with their chunk maps and digests, and the content anchors over them. */
export interface IndexedTargets {
  targets: BaseTarget[];
  infos: TargetInfo[];
  anchors: AnchorIndex;
}

/**
 * Hashes every chunk of the given targets and indexes their content anchors: what a base needs
 * for diff and patch. Used for bases given as files and by the library's import.
 */
export async function indexTargets(list: readonly NewTarget[], progress: Progress): Promise<IndexedTargets> {
  const targets: BaseTarget[] = [];
  const infos: TargetInfo[] = [];
  for (const t of list) {
    if (t.kind === 'blob') {
      targets.push({ name: t.name, kind: t.kind, size: t.blob.length, blob: t.blob });
      infos.push({ name: t.name, kind: t.kind, size: t.blob.length, digest: sha256Hex(t.blob) });
      continue;
    }
    const source = t.source;
    progress.step(`hashing base ${t.name}`, source.size);
    const map = await ChunkMap.build(source, (n) => progress.advance(n));
    progress.done(`hashed base ${t.name}`);
    targets.push({ name: t.name, kind: t.kind, size: source.size, source, map });
    infos.push({ name: t.name, kind: t.kind, size: source.size, digest: map.digest() });
  }
  progress.step('indexing base content anchors');
  const anchors = await anchorBase(targets, (n) => progress.advance(n));
  progress.done('base anchors indexed');
  return { targets, infos, anchors };
}

/** A base VM opened from files: every chunk hashed (the base library keeps these maps instead). */
/**
 * A base given as files, every chunk hashed. `specDigest` (spec/validate.ts) gives it the id a
 * library import of the same files with that VM spec would have.
 */
export async function baseFromImages(vm: VmImages, progress: Progress, specDigest?: string): Promise<BaseVm> {
  const { targets, infos, anchors } = await indexTargets(vmTargets(vm), progress);
  return {
    id: baseIdOf(infos, specDigest),
    anchors,
    targets,
    infos,
    machine: vm.memory?.machineType,
    mainBlock: vm.memory ? mainBlockOf(vm.memory) : undefined,
    ramSectionId: vm.memory?.ramSectionId,
    diskPath: vm.disk?.path,
    diskFormat: vm.disk?.format,
    sources: targets.map((t): BaseSourceSpec => {
      if (t.kind === 'blob') return { kind: 'blob', name: t.name, size: t.size, bytes: t.blob };
      if (t.kind === 'disk')
        return { kind: 'disk', name: t.name, size: t.size, path: vm.disk!.path, format: vm.disk!.format };
      return { kind: 'ram-stream', name: t.name, size: t.size, path: vm.memory!.path! };
    }),
    close: () => vm.close(),
  };
}
