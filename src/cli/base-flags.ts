/**
 * The options that name a base VM, shared by create/apply: a library base (--base ID, a unique
 * id prefix or the base's name) or files (--base-disk, --base-memory).
 */
import type { Command } from 'commander';
import { baseFromImages, openVmImages, type BaseVm } from '../api/vm-images.js';
import { openLibraryBase } from '../base/open.js';
import { resolveBaseId } from '../base/library.js';
import { libraryRoot } from '../base/paths.js';
import { UsageError } from '../util/errors.js';
import type { Progress } from '../util/progress.js';

export interface BaseFlags {
  base?: string;
  baseDisk?: string;
  baseDiskFormat?: string;
  baseMemory?: string;
}

export function baseOptions(cmd: Command): Command {
  return cmd
    .option('--base <id>', 'base VM from the library (id, unique id prefix, or name)')
    .option('--base-disk <image>', 'base VM disk image (raw, qcow2, …), instead of --base')
    .option('--base-disk-format <fmt>', 'format of --base-disk (default: detected)')
    .option('--base-memory <file>', 'base VM memory snapshot (QEMU migration stream or libvirt save image), instead of --base');
}

export async function openBase(flags: BaseFlags, library: string | undefined, progress: Progress): Promise<BaseVm> {
  if (flags.base) {
    if (flags.baseDisk || flags.baseMemory) throw new UsageError('give either --base or --base-disk/--base-memory, not both');
    const root = libraryRoot(library);
    return openLibraryBase(root, await resolveBaseId(root, flags.base));
  }
  if (!flags.baseDisk && !flags.baseMemory) throw new UsageError('name the base VM: --base ID, or --base-disk and/or --base-memory');
  const vm = await openVmImages({ disk: flags.baseDisk, diskFormat: flags.baseDiskFormat, memory: flags.baseMemory });
  try {
    return await baseFromImages(vm, progress);
  } catch (err) {
    await vm.close();
    throw err;
  }
}
