/**
 * The cloudlet-overlay command line: commander wiring only. Each subcommand lives in
 * commands/<name>.ts and calls the API in src/api.
 */
import { Command, CommanderError, Option } from 'commander';
import { runCleanup } from '../util/cleanup.js';
import { ExitCode, exitCodesHelp } from '../util/exit-codes.js';
import { InterruptedError, UsageError } from '../util/errors.js';
import { VERSION } from '../util/version.js';
import { reportError } from './output.js';
import { foregroundHandler } from './signals.js';
import { registerCreate } from './commands/create.js';
import { registerApply } from './commands/apply.js';
import { registerInfo } from './commands/info.js';
import { registerVerify } from './commands/verify.js';
import { registerBase } from './commands/base.js';
import { registerSynthesize } from './commands/synthesize.js';
import { registerLaunch } from './commands/launch.js';
import { registerSnapshot } from './commands/snapshot.js';
import { registerInstances } from './commands/instances.js';
import { registerConsole } from './commands/console.js';
import { registerKey } from './commands/key.js';
import { registerOverlay } from './commands/overlay.js';
import { registerServe } from './commands/serve.js';
import { registerRemote } from './commands/remote.js';
import { registerDiscover } from './commands/discover.js';
import { registerHandoff } from './commands/handoff.js';

export function buildProgram(): Command {
  const program = new Command('cloudlet-overlay')
    .version(VERSION)
    .description(
      'VM synthesis for cloudlets: ship a small overlay (customized VM minus a base VM) and ' +
        'rebuild and resume the customized VM on a server that holds the base.',
    )
    .addOption(new Option('--json', 'machine-readable output: one JSON object on stdout'))
    .addOption(new Option('-q, --quiet', 'no progress and no summary; errors still go to stderr'))
    .addOption(
      new Option('--library <dir>', 'base library directory')
        .env('CLOUDLET_LIBRARY')
        .default(undefined, '$XDG_DATA_HOME/cloudlet-overlay'),
    )
    .showHelpAfterError('(run with --help for usage)')
    .addHelpText('after', `\n${exitCodesHelp()}`);
  program.exitOverride();
  registerCreate(program);
  registerApply(program);
  registerInfo(program);
  registerVerify(program);
  registerBase(program);
  registerSnapshot(program);
  registerLaunch(program);
  registerSynthesize(program);
  registerInstances(program);
  registerConsole(program);
  registerKey(program);
  registerOverlay(program);
  registerServe(program);
  registerRemote(program);
  registerDiscover(program);
  registerHandoff(program);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  const json = argv.includes('--json');
  // Under --json commander's own messages would be a second, non-JSON outcome: ours says it.
  if (json) {
    const quiet = (c: Command): void => {
      c.configureOutput({ writeErr: () => undefined });
      c.commands.forEach(quiet);
    };
    quiet(program);
  }
  let signalled = false;
  let interrupted: Promise<void> | undefined;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (signalled) return;
    signalled = true;
    const foreground = foregroundHandler();
    if (foreground) {
      foreground(signal);
      return;
    }
    // The interrupt is the outcome: whatever the interrupted operation throws meanwhile (its
    // files vanish under it) is not reported, the process ends here with 130.
    interrupted = runCleanup().then(() => {
      reportError(new InterruptedError(`interrupted by ${signal}; partial outputs removed`), json);
      process.exit(ExitCode.interrupted);
    });
  };
  // `cloudlet-overlay ps | head`: a closed pipe ends the output, it is not an error.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(ExitCode.ok);
    throw err;
  });
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await program.parseAsync(argv);
    // A command may set a status of its own (console --run: the guest command failed).
    return typeof process.exitCode === 'number' ? process.exitCode : ExitCode.ok;
  } catch (err) {
    if (interrupted) await interrupted;
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.exitCode === 0)
        return ExitCode.ok;
      if (!json) return ExitCode.usage; // commander said why on stderr
      const message = err.message.replace(/^error: /, '');
      return reportError(new UsageError(message, { commander_code: err.code }), json);
    }
    await runCleanup();
    if (interrupted) await interrupted;
    return reportError(err, json);
  }
}
