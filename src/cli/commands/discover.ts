import type { Command } from 'commander';
import { Option } from 'commander';
import { discover } from '../../api/discover.js';
import { readToken } from '../../api/remote.js';
import { printResult, table, type GlobalOptions } from '../output.js';
import { durationArg, intArg } from '../parse.js';

interface DiscoverFlags {
  base?: string;
  directory?: string;
  mdns?: string;
  mdnsPort?: number;
  tokenFile?: string;
  timeout: number;
}

export function registerDiscover(program: Command): void {
  program
    .command('discover')
    .summary('list reachable cloudlets, best first: holds the base, then round-trip time, then free resources')
    .option('--base <id>', 'the base you need (id, unique prefix or name)')
    .addOption(new Option('--directory <url>', 'ask this directory (serve --directory)').env('CLOUDLET_DIRECTORY'))
    .option('--mdns <address>', 'browse mDNS (_cloudlet._tcp) on the interface with this IPv4 address')
    .addOption(new Option('--mdns-port <port>', 'mDNS port (tests)').argParser(intArg))
    .option('--token-file <file>', 'bearer token for the directory (default $CLOUDLET_TOKEN)')
    .addOption(
      new Option('--timeout <duration>', 'how long to listen for mDNS answers')
        .argParser(durationArg)
        .default(1500, '1.5s'),
    )
    .action(async (f: DiscoverFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await discover({
        base: f.base,
        directory: f.directory,
        mdns: f.mdns,
        mdnsPort: f.mdnsPort,
        token: await readToken(f.tokenFile),
        timeoutMs: f.timeout,
      });
      printResult(g, r, () => {
        if (r.cloudlets.length === 0) return 'no cloudlets found';
        const rows = [['name', 'url', 'base', 'rtt ms', 'free MiB', 'cpus', 'load', 'via']];
        for (const c of r.cloudlets) {
          rows.push([
            c.name,
            c.url,
            c.has_base ? 'yes' : 'no',
            c.rtt_ms === null ? 'unreachable' : c.rtt_ms.toFixed(1),
            String(Math.round(c.mem_free_bytes / 2 ** 20)),
            String(c.cpus),
            c.load1.toFixed(2),
            c.via,
          ]);
        }
        return table(rows);
      });
    });
}
