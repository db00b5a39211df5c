/**
 * Naming the base VM of create/apply: a library base (an id, a unique id prefix or a name), or
 * files (a disk image and/or a memory snapshot, every chunk hashed on open). The operations take
 * either an open BaseVm (benchmarks, tests) or a BaseRef they open and close themselves.
 */
import { openLibraryBase } from '../base/open.js';
import { resolveBaseId } from '../base/library.js';
import { libraryRoot } from '../base/paths.js';
import type { BaseVm } from '../targets/base-vm.js';
import { baseFromImages } from '../targets/base-vm.js';
import { openVmImages } from '../targets/vm-images.js';
import { UsageError } from '../util/errors.js';
import type { Progress } from '../util/progress.js';

export type { BaseVm } from '../targets/base-vm.js';

export interface BaseRef {
  /** A library base: id, unique id prefix or name. */
  base?: string;
  /** The library directory (default: libraryRoot()). */
  library?: string;
  /** Or the base as files. */
  baseDisk?: string;
  baseDiskFormat?: string;
  baseMemory?: string;
}

export async function openBase(ref: BaseRef, progress: Progress): Promise<BaseVm> {
  if (ref.base) {
    if (ref.baseDisk || ref.baseMemory)
      throw new UsageError('give either --base or --base-disk/--base-memory, not both');
    const root = libraryRoot(ref.library);
    return openLibraryBase(root, await resolveBaseId(root, ref.base));
  }
  if (!ref.baseDisk && !ref.baseMemory) {
    throw new UsageError('name the base VM: --base ID, or --base-disk and/or --base-memory');
  }
  const vm = await openVmImages({ disk: ref.baseDisk, diskFormat: ref.baseDiskFormat, memory: ref.baseMemory });
  try {
    return await baseFromImages(vm, progress);
  } catch (err) {
    await vm.close();
    throw err;
  }
}

/** Runs `fn` with the base: an open BaseVm as it is, a BaseRef opened for the call and closed after. */
export async function withBase<T>(
  base: BaseVm | BaseRef,
  progress: Progress,
  fn: (base: BaseVm) => Promise<T>,
): Promise<T> {
  if ('targets' in base) return fn(base);
  const opened = await openBase(base, progress);
  try {
    return await fn(opened);
  } finally {
    await opened.close();
  }
}
