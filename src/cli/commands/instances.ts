import { Command } from 'commander';
import { readFile } from 'node:fs/promises';
import { listInstances } from '../../base/instances.js';
import { libraryRoot } from '../../base/paths.js';
import { findInstance, stopInstance } from '../../api/instance.js';
import { NotFoundError } from '../../util/errors.js';
import { printResult, table, type GlobalOptions } from '../output.js';

export function registerInstances(program: Command): void {
  program
    .command('ps')
    .summary('list synthesized and launched VMs (a VM whose QEMU died shows as dead)')
    .action(async (_f: object, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const list = await listInstances(libraryRoot(g.library));
      printResult(g, { message_type: 'ps', instances: list.map(({ spec: _spec, ...rest }) => rest) }, () => {
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
      const s = await findInstance(libraryRoot(g.library), ref);
      const path = flags.qemu ? s.stderr_log : s.serial_log;
      const text = await readFile(path, 'utf8').catch(() => {
        throw new NotFoundError(`no log at ${path}`, { path });
      });
      if (g.json) process.stdout.write(JSON.stringify({ message_type: 'logs', instance: s.id, path, text }) + '\n');
      else process.stdout.write(text);
    });
}
