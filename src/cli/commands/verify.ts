import type { Command } from 'commander';
import { verifyOverlay } from '../../api/inspect.js';
import { CorruptInputError } from '../../util/errors.js';
import { makeProgress } from '../progress.js';
import { printResult, type GlobalOptions } from '../output.js';

export function registerVerify(program: Command): void {
  program
    .command('verify')
    .summary('check every segment and checksum of an overlay (no base needed)')
    .argument('<overlay>', 'overlay file')
    .action(async (path: string, _flags: object, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await verifyOverlay(path, makeProgress(g));
      if (!r.ok) {
        for (const p of r.problems)
          process.stderr.write(`${path}: ${p.segment === undefined ? '' : `segment ${p.segment}: `}${p.message}\n`);
        throw new CorruptInputError(`${path}: ${r.problems.length} problem(s) found`, {
          problems: r.problems.map((p) => p.message),
        });
      }
      printResult(g, r, () => `${path}: ok (${r.segments} segments, ${r.records} records)`);
    });
}
