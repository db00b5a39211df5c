/**
 * The options that name a base VM, shared by create/apply: files (--base-disk, --base-memory)
 * for now; a library base (--base ID) when the base library exists.
 */
import type { Command } from 'commander';
import { baseFromImages, openVmImages, type BaseVm } from '../api/vm-images.js';
import { UsageError } from '../util/errors.js';
import type { Progress } from '../util/progress.js';

export interface BaseFlags {
  baseDisk?: string;
  baseDiskFormat?: string;
  baseMemory?: string;
}

export function baseOptions(cmd: Command): Command {
  return cmd
    .option('--base-disk <image>', 'base VM disk image (raw, qcow2, …)')
    .option('--base-disk-format <fmt>', 'format of --base-disk (default: detected)')
    .option('--base-memory <file>', 'base VM memory snapshot (QEMU migration stream or libvirt save image)');
}

export async function openBase(flags: BaseFlags, progress: Progress, need: { disk: boolean; memory: boolean }): Promise<BaseVm> {
  if (!flags.baseDisk && !flags.baseMemory) throw new UsageError('name the base VM: --base-disk and/or --base-memory');
  void need;
  const vm = await openVmImages({ disk: flags.baseDisk, diskFormat: flags.baseDiskFormat, memory: flags.baseMemory });
  try {
    return await baseFromImages(vm, progress);
  } catch (err) {
    await vm.close();
    throw err;
  }
}
