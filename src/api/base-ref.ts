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
import { CorruptInputError, NotFoundError, UsageError } from '../util/errors.js';
import type { Progress } from '../util/progress.js';
import { readInputFile } from '../util/input-file.js';
import type { VmSpec } from '../spec/vm-spec.js';
import {
  parseSpec,
  specDigest,
  storedSpecOf,
  withoutHostSide,
  type SpecFile,
  type SpecFileDigests,
} from '../spec/validate.js';
import { hashFile } from '../base/vm-files.js';
import { sweepLibrary } from './gc.js';

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
  /**
   * With files: the VM spec (a snapshot's vm.json) the base was imported with, so the base gets
   * the id its library import has (the id covers the spec).
   */
  baseVm?: string;
}

/** A VM spec file: a snapshot directory's vm.json (`{ vm: … }`) or a bare VmSpec. */
export async function readVmSpecFile(file: string): Promise<VmSpec> {
  const text = (await readInputFile(file, 1 << 20, 'VM spec')).toString('utf8');
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new CorruptInputError(`${file}: not valid JSON`, { path: file });
  }
  if (typeof parsed !== 'object' || parsed === null) throw new CorruptInputError(`${file}: not a VM spec`);
  return 'vm' in parsed ? (parsed as { vm: VmSpec }).vm : (parsed as VmSpec);
}

export async function openBase(ref: BaseRef, progress: Progress): Promise<BaseVm> {
  if (ref.base) {
    if (ref.baseDisk || ref.baseMemory || ref.baseVm)
      throw new UsageError('give either --base or --base-disk/--base-memory/--base-vm, not both');
    const root = libraryRoot(ref.library);
    await sweepLibrary(root);
    return openLibraryBase(root, await resolveBaseId(root, ref.base));
  }
  if (!ref.baseDisk && !ref.baseMemory) {
    throw new UsageError('name the base VM: --base ID, or --base-disk and/or --base-memory');
  }
  const input = ref.baseVm ? parseSpec(withoutHostSide(await readVmSpecFile(ref.baseVm)), 'input') : undefined;
  const vm = await openVmImages({ disk: ref.baseDisk, diskFormat: ref.baseDiskFormat, memory: ref.baseMemory });
  try {
    let digest: string | undefined;
    if (input) {
      const format = vm.disk?.format === 'raw' ? 'raw' : 'qcow2';
      const { spec, sources } = storedSpecOf(input, vm.disk ? { file: `disk.${format}`, format } : undefined);
      const files: SpecFileDigests = {};
      for (const [name, from] of Object.entries(sources) as Array<[SpecFile, string]>) {
        files[name] = await hashFile(from).catch((err: unknown) => {
          throw new NotFoundError(`the VM spec's ${name} ${from} cannot be read: ${(err as Error).message}`, {
            path: from,
          });
        });
      }
      digest = specDigest(spec, files);
    }
    return await baseFromImages(vm, progress, digest);
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
