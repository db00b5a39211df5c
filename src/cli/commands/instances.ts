import type { Command } from 'commander';
import { libraryRoot } from '../../api/base.js';
import { instanceLog, listInstanceSummaries, stopInstance } from '../../api/instance.js';
import { printResult, table, type GlobalOptions } from '../output.js';

export function registerInstances(program: Command): void {
  program
    .command('ps')
    .summary('list synthesized and launched VMs (a VM whose QEMU died shows as dead)')
    .action(async (_f: object, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await listInstanceSummaries(libraryRoot(g.library));
      const list = r.instances;
      printResult(g, r, () => {
        if (list.length === 0) return 'no instances';
        const rows = [['instance', 'status', 'pid', 'base', 'forwards', 'created']];
        for (const i of list) {
          rows.push([
            i.id,
            i.status,
            String(i.pid),
            i.base_id.slice(0, 12),
            i.forwards.map((f) => `${f.hostPort}→${f.guestPort}`).join(' '),
            i.created_at.slice(0, 19),
          ]);
        }
        return table(rows);
      });
    });

  program
    .command('stop')
    .summary('stop a VM (QMP quit, then kill) and remove its instance directory')
    .argument('<instance>', 'instance id (or unique prefix)')
    .option('--keep', 'keep the instance directory (disk, memory, logs)')
    .action(async (ref: string, flags: { keep?: boolean }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await stopInstance(libraryRoot(g.library), ref, flags.keep);
      printResult(g, r, () => `${r.was === 'running' ? 'stopped' : 'cleaned up dead instance'} ${r.instance}`);
    });

  program
    .command('logs')
    .summary("print a VM's serial console log (and QEMU's own messages with --qemu)")
    .argument('<instance>', 'instance id (or unique prefix)')
    .option('--qemu', "QEMU's stderr instead of the serial console")
    .action(async (ref: string, flags: { qemu?: boolean }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await instanceLog(libraryRoot(g.library), ref, flags.qemu);
      if (g.json) process.stdout.write(JSON.stringify(r) + '\n');
      else process.stdout.write(r.text);
    });
}
