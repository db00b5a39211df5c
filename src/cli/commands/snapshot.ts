import type { Command } from 'commander';
import { Option } from 'commander';
import { snapshotVm } from '../../api/snapshot.js';
import { libraryRoot } from '../../api/base.js';
import { makeProgress } from '../progress.js';
import { bytes, printResult, type GlobalOptions } from '../output.js';

interface SnapshotFlags {
  instance?: string;
  qmp?: string;
  disk?: string;
  output: string;
  then: 'resume' | 'quit';
}

export function registerSnapshot(program: Command): void {
  program
    .command('snapshot')
    .summary('capture a running VM (memory + disk + VM spec) into a snapshot directory')
    .description(
      'Stop the VM, write its memory as a QEMU migration stream (bandwidth cap lifted), copy its disk ' +
        'while stopped (so both are one instant), record the VM spec from the running QEMU, then resume ' +
        'or quit it. The directory (memory.stream, disk.*, vm.json) is what `base import` and `create` ' +
        'take, and appears only when complete.',
    )
    .option('--instance <id>', 'an instance started by launch/synthesize')
    .option('--qmp <socket>', "any QEMU's QMP unix socket (-qmp unix:SOCKET,server=on,wait=off)")
    .option('--disk <image>', "the VM's disk image (default: its first drive)")
    .requiredOption('-o, --output <dir>', 'snapshot directory to create')
    .addOption(new Option('--then <what>', 'after the capture').choices(['resume', 'quit']).default('resume'))
    .action(async (flags: SnapshotFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await snapshotVm({
        root: libraryRoot(g.library),
        instance: flags.instance,
        qmp: flags.qmp,
        disk: flags.disk,
        outDir: flags.output,
        afterCapture: flags.then,
        progress: makeProgress(g),
      });
      printResult(
        g,
        r,
        () =>
          `snapshot in ${r.dir}: memory ${bytes(r.memory_bytes)}` +
          `${r.disk ? `, disk ${r.disk}` : ''} (${r.timings_ms.total} ms)`,
      );
    });
}
