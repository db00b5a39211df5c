import { Command } from 'commander';
import { connect } from 'node:net';
import { findInstance } from '../../api/instance.js';
import { libraryRoot } from '../../base/paths.js';
import { SerialConsole } from '../../vm/console.js';
import { CloudletError, NotFoundError } from '../../util/errors.js';
import { printResult, type GlobalOptions } from '../output.js';
import { durationArg } from '../parse.js';

export function registerConsole(program: Command): void {
  program
    .command('console')
    .summary("a VM's serial console: interactive, or run one shell command with --run")
    .description(
      "Connects to an instance's serial console. Interactive: your terminal is the console (Ctrl-] quits).\n" +
        'With --run, types one command into the guest shell, prints its output and exits with its status ' +
        '(for guests with a shell on the console, like the demo VM).',
    )
    .argument('<instance>', 'instance id (or unique prefix)')
    .option('--run <command>', 'run one shell command in the guest and print its output')
    .option('--timeout <duration>', 'for --run: how long the command may take', durationArg, 60_000)
    .action(async (ref: string, flags: { run?: string; timeout: number }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const s = await findInstance(libraryRoot(g.library), ref);
      if (flags.run !== undefined) {
        const con = await SerialConsole.connect(s.serial_socket).catch((err: unknown) => {
          throw new NotFoundError(`cannot reach the console of ${s.id}: ${(err as Error).message}`, { instance: s.id });
        });
        try {
          await con.ready({ timeoutMs: 20_000 });
          const r = await con.run(flags.run, { timeoutMs: flags.timeout });
          printResult(g, { message_type: 'console_run', instance: s.id, status: r.status, output: r.output }, () => r.output.trimEnd());
          if (r.status !== 0) process.exitCode = 1;
        } finally {
          await con.close();
        }
        return;
      }
      await new Promise<void>((resolve, reject) => {
        const sock = connect(s.serial_socket);
        sock.once('error', (err) => reject(new CloudletError(`console of ${s.id}: ${err.message}`)));
        sock.once('connect', () => {
          process.stderr.write(`connected to ${s.id} (Ctrl-] to quit)\n`);
          if (process.stdin.isTTY) process.stdin.setRawMode(true);
          process.stdin.on('data', (d: Buffer) => {
            if (d.includes(0x1d)) {
              sock.end();
              return;
            }
            sock.write(d);
          });
          sock.pipe(process.stdout);
        });
        sock.once('close', () => {
          if (process.stdin.isTTY) process.stdin.setRawMode(false);
          process.stdin.pause();
          resolve();
        });
      });
    });
}
