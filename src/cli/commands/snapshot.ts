import type { Command } from 'commander';
import { Option } from 'commander';
import { snapshotVm } from '../../api/snapshot.js';
import { libraryRoot } from '../../api/base.js';
import { makeProgress } from '../progress.js';
import { bytes, printResult, type GlobalOptions } from '../output.js';
import { intArg } from '../parse.js';

interface SnapshotFlags {
  instance?: string;
  qmp?: string;
  disk?: string;
  output: string;
  then: 'resume' | 'quit';
  trim?: boolean;
  freeze?: boolean;
  dropCaches?: boolean;
  zeroFreeMemory?: boolean;
  via: 'auto' | 'agent' | 'console';
  freezeWindow: number;
  agent?: string;
  console?: string;
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
    .option(
      '--trim',
      'first trim the guest file systems (fstrim): freed blocks become zero clusters of a disk launched ' +
        'with discard (launch does that) and cost the overlay nothing',
    )
    .option(
      '--freeze',
      'freeze the guest file systems for the capture (fsfreeze): their allocation bitmaps on disk are then ' +
        'current, which `create --free-blocks auto` needs; thawed again after every resume',
    )
    .option(
      '--drop-caches',
      "first drop the guest's page cache (sync; echo 3 > /proc/sys/vm/drop_caches): a smaller memory part, " +
        'a slower first read of each file afterwards; changes guest behaviour, so off by default',
    )
    .option(
      '--zero-free-memory',
      "first overwrite the guest's free memory with zeros (a tmpfs filled and freed): free pages still hold " +
        'deleted files and dropped caches, and cost the overlay as much as pages in use',
    )
    .addOption(
      new Option('--via <channel>', 'how to reach the guest for --trim/--freeze/--drop-caches')
        .choices(['auto', 'agent', 'console'])
        .default('auto'),
    )
    .addOption(
      new Option('--freeze-window <s>', 'console freezes: the guest thaws itself this many seconds after it runs')
        .default(3)
        .argParser(intArg),
    )
    .option('--agent <socket>', 'guest agent socket of a VM that is not ours (with --qmp)')
    .option('--console <socket>', 'serial console socket of a VM that is not ours (with --qmp)')
    .addHelpText(
      'after',
      `
Leaving out what the guest threw away (docs/semantic-gap.md):
  --trim              fstrim in the guest (qemu-ga guest-fstrim, or the serial console); the drive must
                      pass discards on — launch does (discard=unmap); your own VMs: -drive …,discard=unmap
                      and \`virsh domfstrim\` before your snapshot
  --freeze            qemu-ga guest-fsfreeze-freeze (thawed after the capture, and after every resume:
                      synthesize thaws through the agent), or fsfreeze over the console with a timer that
                      thaws the guest itself (--freeze-window); then create --free-blocks auto leaves free
                      blocks out. \`sync\` is not enough: a mounted ext4's bitmaps are trusted only frozen.
  --zero-free-memory  free pages keep what they held (deleted files, dropped caches); zeroed, they cost
                      nothing (Linux guests)
  --drop-caches       with --zero-free-memory: a much smaller memory part, the disk part carries the files
                      instead, first reads slower; alone it changes nothing (freed pages keep their bytes)
  --via auto          the guest agent when the VM has a channel (VmSpec guestAgent) and qemu-ga answers,
                      else the serial console (a root shell on it, as the demo VM has).`,
    )
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
        guest: {
          trim: flags.trim,
          freeze: flags.freeze,
          dropCaches: flags.dropCaches,
          zeroFreeMemory: flags.zeroFreeMemory,
          via: flags.via,
          freezeWindowS: flags.freezeWindow,
        },
        agentSocket: flags.agent,
        serialSocket: flags.console,
      });
      printResult(g, r, () => {
        const lines = [
          `snapshot in ${r.dir}: memory ${bytes(r.memory_bytes)}` +
            `${r.disk ? `, disk ${r.disk}` : ''} (${r.timings_ms.total} ms)`,
        ];
        if (r.guest) {
          const done = [
            r.guest.dropped_caches ? 'page cache dropped' : '',
            r.guest.zeroed_mib !== undefined ? `${r.guest.zeroed_mib} MiB of free memory zeroed` : '',
            r.guest.trimmed_bytes !== undefined ? `${bytes(r.guest.trimmed_bytes)} trimmed` : '',
            r.guest.frozen !== undefined ? `frozen (${String(r.guest.frozen)})` : '',
          ].filter(Boolean);
          lines.push(`guest (${r.guest.channel}): ${done.join(', ') || 'nothing to do'}`);
        }
        for (const f of r.file_systems ?? []) {
          lines.push(
            `  ${f.type}${f.partition !== null ? ` (partition ${f.partition})` : ''}: ` +
              (f.trusted ? `trusted, ${bytes(f.free_bytes)} free` : `not trusted: ${f.reason ?? ''}`),
          );
        }
        return lines.join('\n');
      });
    });
}
