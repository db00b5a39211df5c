import type { Command } from 'commander';
import { verifyOverlay } from '../../api/inspect.js';
import { CorruptInputError } from '../../util/errors.js';
import { makeProgress } from '../progress.js';
import { clean, printResult, type GlobalOptions } from '../output.js';
import { trust, trustOption, type TrustFlags } from '../trust-flags.js';

export function registerVerify(program: Command): void {
  const cmd = program
    .command('verify')
    .summary('check every segment, checksum and the signature of an overlay (no base needed)')
    .argument('<overlay>', 'overlay file');
  trustOption(cmd).action(async (path: string, flags: TrustFlags, command: Command) => {
    const g = command.optsWithGlobals<GlobalOptions>();
    const r = await verifyOverlay(path, makeProgress(g), { trust: await trust(flags) });
    if (!r.ok) {
      const total = r.problems.length + r.problems_omitted;
      if (!g.json) {
        for (const p of r.problems)
          process.stderr.write(
            clean(`${path}: ${p.segment === undefined ? '' : `segment ${p.segment}: `}${p.message}`) + '\n',
          );
        if (r.problems_omitted) process.stderr.write(`${clean(path)}: … and ${r.problems_omitted} more\n`);
      }
      throw new CorruptInputError(
        `${path}: ${total} problem(s) found` + (r.problems_omitted ? ` (${r.problems_omitted} not listed)` : ''),
        { problems: r.problems.map((p) => p.message), problems_omitted: r.problems_omitted },
      );
    }
    const signed = r.signature.status === 'verified' ? `, signed by ${r.signature.trusted_as ?? ''}` : '';
    printResult(g, r, () => clean(`${path}: ok (${r.segments} segments, ${r.records} records${signed})`));
  });
}
