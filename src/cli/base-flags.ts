/**
 * The options that name a base VM, shared by create/apply: a library base (--base ID, a unique
 * id prefix or the base's name) or files (--base-disk, --base-memory). api/base-ref.ts opens it.
 */
import type { Command } from 'commander';

export interface BaseFlags {
  base?: string;
  baseDisk?: string;
  baseDiskFormat?: string;
  baseMemory?: string;
  baseVm?: string;
}

export function baseOptions(cmd: Command): Command {
  return cmd
    .option('--base <id>', 'base VM from the library (id, unique id prefix, or name)')
    .option('--base-disk <image>', 'base VM disk image (raw, qcow2, …), instead of --base')
    .option('--base-disk-format <fmt>', 'format of --base-disk (default: detected)')
    .option(
      '--base-memory <file>',
      'base VM memory snapshot (QEMU migration stream or libvirt save image), instead of --base',
    )
    .option(
      '--base-vm <file>',
      "with --base-disk/--base-memory: the base's VM spec (vm.json), so the base has its library id",
    );
}

/** The flags as the API's BaseRef. */
export function baseRef(flags: BaseFlags): BaseFlags {
  return {
    base: flags.base,
    baseDisk: flags.baseDisk,
    baseDiskFormat: flags.baseDiskFormat,
    baseMemory: flags.baseMemory,
    baseVm: flags.baseVm,
  };
}
