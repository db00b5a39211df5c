import type { Command } from 'commander';
import { readFile } from 'node:fs/promises';
import { libraryRoot } from '../../api/base.js';
import { handoff } from '../../api/handoff.js';
import { readToken } from '../../api/remote.js';
import { makeProgress } from '../progress.js';
import { printResult, type GlobalOptions } from '../output.js';

interface HandoffFlags {
  to: string;
  tokenFile?: string;
  cacert?: string;
  waitPath?: string;
  keep?: boolean;
}

export function registerHandoff(program: Command): void {
  program
    .command('handoff')
    .summary('move a running instance to another cloudlet that holds its base; stop it here once it answers there')
    .argument('<instance>', 'instance id (or unique prefix)')
    .requiredOption('--to <url>', 'the target cloudlet’s API URL')
    .option('--token-file <file>', 'bearer token for the target (default $CLOUDLET_TOKEN)')
    .option('--cacert <file>', 'trust this CA (PEM) for an https target')
    .option('--wait-path <path>', 'ready on the target = this path answers HTTP on the first forward')
    .option('--keep', 'keep the source instance directory after stopping it')
    .action(async (id: string, f: HandoffFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await handoff({
        root: libraryRoot(g.library),
        instance: id,
        to: f.to,
        token: await readToken(f.tokenFile),
        ca: f.cacert ? await readFile(f.cacert) : undefined,
        waitPath: f.waitPath,
        keep: f.keep,
        progress: makeProgress(g),
      });
      printResult(
        g,
        r,
        () =>
          `handed ${r.from} off to ${r.to} as ${r.instance}: downtime ${r.downtime_ms} ms, overlay ${r.overlay_bytes} bytes` +
          (r.target.endpoints?.length
            ? `\n${r.target.endpoints.map((e) => `  guest port ${e.guestPort} → ${e.url}`).join('\n')}`
            : ''),
      );
    });
}
