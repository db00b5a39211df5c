import type { Command } from 'commander';
import { Option } from 'commander';
import { launchBase } from '../../api/launch.js';
import { libraryRoot } from '../../api/base.js';
import type { AccelChoice, PortForward } from '../../api/types.js';
import { printResult, type GlobalOptions } from '../output.js';
import { QEMU_ARG_HELP, collect, forwardArg } from '../parse.js';

export function registerLaunch(program: Command): void {
  program
    .command('launch')
    .summary('resume a base VM with a fresh disk layer, to customize it')
    .description(
      'Resume a library base (already running, no boot) with a fresh qcow2 disk layer over the base ' +
        'disk and leave it running in the background. Reach the guest through port forwards or its ' +
        'serial console socket, install your application, then capture it and make the overlay:\n' +
        '  cloudlet-overlay snapshot --instance ID -o ./custom\n' +
        '  cloudlet-overlay create --base BASE --disk ./custom/disk.qcow2 --memory ./custom/memory.stream \\\n' +
        '      -o app.overlay',
    )
    .argument('<base>', 'base VM from the library (id, unique id prefix, or name)')
    .option('--customize', 'say that this instance is for customization (prints the next steps)')
    .addOption(
      new Option(
        '--forward <spec>',
        'port forward tcp:127.0.0.1:HOSTPORT-:GUESTPORT or HOSTPORT:GUESTPORT (repeatable)',
      )
        .argParser(forwardArg)
        .default([]),
    )
    .addOption(new Option('--accel <accel>', 'accelerator').choices(['auto', 'kvm', 'tcg']).default('auto'))
    .addOption(new Option('--qemu-arg <arg>', QEMU_ARG_HELP).argParser(collect))
    .option(
      '--no-discard',
      "drop the guest's discards instead of passing them to the disk layer (default: discard=unmap," +
        'detect-zeroes=unmap, so that trimmed blocks cost the overlay nothing; the guest sees no difference)',
    )
    .action(
      async (
        base: string,
        flags: {
          customize?: boolean;
          forward: PortForward[];
          accel: AccelChoice;
          qemuArg?: string[];
          discard: boolean;
        },
        command: Command,
      ) => {
        const g = command.optsWithGlobals<GlobalOptions>();
        const r = await launchBase({
          root: libraryRoot(g.library),
          base,
          forwards: flags.forward,
          accel: flags.accel,
          qemuArgs: flags.qemuArg,
          discard: flags.discard,
        });
        printResult(g, r, () => {
          const lines = [
            `instance ${r.instance} running (pid ${r.pid}, ${r.accel}) from base ${r.base_id.slice(0, 12)}`,
            `  serial console: ${r.serial_socket}`,
          ];
          for (const f of r.forwards)
            lines.push(`  ${f.hostAddr ?? '127.0.0.1'}:${f.hostPort} → guest port ${f.guestPort}`);
          if (flags.customize) {
            lines.push(
              'customize the guest, then (--trim: freed blocks cost nothing; --freeze + create --free-blocks auto):',
              `  cloudlet-overlay snapshot --instance ${r.instance} -o ./custom --trim --then quit`,
              `  cloudlet-overlay create --base ${r.base_id.slice(0, 12)} --disk ./custom/disk.qcow2 ` +
                '--memory ./custom/memory.stream -o app.overlay',
            );
          }
          return lines.join('\n');
        });
      },
    );
}
