import type { Command } from 'commander';
import { Option } from 'commander';
import { readFile } from 'node:fs/promises';
import { CloudletClient, readToken, type RemoteSynthesizeResult } from '../../api/remote.js';
import { makeProgress } from '../progress.js';
import { printResult, table, type GlobalOptions } from '../output.js';
import { intArg } from '../parse.js';

interface RemoteFlags {
  cloudlet: string;
  tokenFile?: string;
  cacert?: string;
}

/** Flags every remote command takes: where the cloudlet is and how to prove who we are. */
export function addCloudletFlags(c: Command): Command {
  return c
    .addOption(new Option('--cloudlet <url>', 'the cloudlet’s API URL').env('CLOUDLET_URL').makeOptionMandatory())
    .option('--token-file <file>', 'bearer token (first line; default $CLOUDLET_TOKEN)')
    .option('--cacert <file>', 'trust this CA (PEM) for an https cloudlet with its own certificate');
}

export async function clientFor(f: RemoteFlags): Promise<CloudletClient> {
  return new CloudletClient(f.cloudlet, {
    token: await readToken(f.tokenFile),
    ca: f.cacert ? await readFile(f.cacert) : undefined,
  });
}

function guestPortArg(value: string, previous: number[] = []): number[] {
  return [...previous, intArg(value)];
}

export function registerRemote(program: Command): void {
  const remote = program
    .command('remote')
    .summary('use a cloudlet over its HTTP API: synthesize there, list, stop, logs (docs/service.md)');

  addCloudletFlags(
    remote
      .command('synthesize')
      .summary('synthesize an overlay on a cloudlet: a local file (uploaded with progress) or a URL it fetches')
      .argument('<overlay>', 'overlay file, or an http(s):// or glance:// URL for the cloudlet to fetch')
      .requiredOption('--base <id>', 'base VM on the cloudlet (id, unique prefix or name)')
      .addOption(
        new Option('--guest-port <port>', 'guest port to forward (repeatable); the cloudlet picks the host port')
          .argParser(guestPortArg)
          .makeOptionMandatory(),
      )
      .option('--wait-path <path>', 'ready = this path answers HTTP on the first forward (e.g. /cgi-bin/status)')
      .option('--name <name>', 'what to call the overlay there'),
  ).action(
    async (
      overlay: string,
      f: RemoteFlags & { base: string; guestPort: number[]; waitPath?: string; name?: string },
      command: Command,
    ) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const c = await clientFor(f);
      const r = await c.synthesize({
        base: f.base,
        overlay,
        guestPorts: f.guestPort,
        waitPath: f.waitPath,
        name: f.name,
        progress: makeProgress(g),
      });
      printResult(g, r, () => summary(c.url.origin, r));
    },
  );

  addCloudletFlags(remote.command('ps').summary("the cloudlet's instances")).action(
    async (f: RemoteFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await (await clientFor(f)).list();
      printResult(g, r, () => {
        if (r.instances.length === 0) return 'no instances';
        const rows = [['instance', 'status', 'launcher', 'base', 'forwards']];
        for (const i of r.instances) {
          const fw = (i['forwards'] as Array<{ hostPort: number; guestPort: number }> | undefined) ?? [];
          rows.push([
            i.id,
            String(i['status']),
            typeof i['launcher'] === 'string' ? i['launcher'] : 'qemu',
            String(i['base_id']).slice(0, 12),
            fw.map((x) => `${x.hostPort}→${x.guestPort}`).join(' '),
          ]);
        }
        return table(rows);
      });
    },
  );

  addCloudletFlags(remote.command('stop').summary('stop an instance on the cloudlet').argument('<instance>')).action(
    async (id: string, f: RemoteFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await (await clientFor(f)).stop(id);
      printResult(g, r, () => `stopped ${r.instance}`);
    },
  );

  addCloudletFlags(
    remote
      .command('logs')
      .summary("an instance's serial console log (or QEMU's messages with --qemu)")
      .argument('<instance>')
      .option('--qemu', "QEMU's own messages"),
  ).action(async (id: string, f: RemoteFlags & { qemu?: boolean }, command: Command) => {
    const g = command.optsWithGlobals<GlobalOptions>();
    const r = await (await clientFor(f)).logs(id, f.qemu);
    if (g.json) process.stdout.write(JSON.stringify(r) + '\n');
    else process.stdout.write(r.text);
  });

  addCloudletFlags(remote.command('bases').summary('the bases the cloudlet holds')).action(
    async (f: RemoteFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await (await clientFor(f)).bases();
      printResult(g, r, () => r.bases.map((b) => `${b.id.slice(0, 12)}  ${b.name ?? ''}`).join('\n') || 'no bases');
    },
  );

  addCloudletFlags(remote.command('info').summary('what the cloudlet holds and has free')).action(
    async (f: RemoteFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await (await clientFor(f)).info();
      printResult(g, r, () => JSON.stringify(r, null, 2));
    },
  );
}

function summary(origin: string, r: RemoteSynthesizeResult): string {
  const lines = [
    `instance ${r.instance} running on ${origin} (${r.launcher ?? 'qemu'}${r.domain ? `, domain ${r.domain}` : ''})`,
  ];
  for (const e of r.endpoints ?? []) lines.push(`  guest port ${e.guestPort} → ${e.url}`);
  if (r.answer) lines.push(`first answer: HTTP ${r.answer.status}`, r.answer.body.trimEnd());
  return lines.join('\n');
}
