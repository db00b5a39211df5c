import type { Command } from 'commander';
import { libraryRoot } from '../../api/base.js';
import { attachConsole, runInConsole } from '../../api/console.js';
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
      const root = libraryRoot(g.library);
      if (flags.run !== undefined) {
        const r = await runInConsole(root, ref, flags.run, flags.timeout);
        printResult(g, r, () => r.output.trimEnd());
        if (r.status !== 0) process.exitCode = 1;
        return;
      }
      await attachConsole(root, ref, {
        input: process.stdin,
        output: process.stdout,
        onConnect(instance) {
          process.stderr.write(`connected to ${instance} (Ctrl-] to quit)\n`);
          if (process.stdin.isTTY) process.stdin.setRawMode(true);
        },
        onClose() {
          if (process.stdin.isTTY) process.stdin.setRawMode(false);
          process.stdin.pause();
        },
      });
    });
}
