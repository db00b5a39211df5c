import type { Command } from 'commander';
import { Option } from 'commander';
import { cpus } from 'node:os';
import { libraryRoot } from '../../api/base.js';
import { serveCloudlet } from '../../service/serve.js';
import { onForegroundSignal } from '../signals.js';
import { printResult, type GlobalOptions } from '../output.js';
import { bytesArg, durationArg, intArg } from '../parse.js';

interface ServeFlags {
  listen: string;
  tokenFile: string;
  tlsCert?: string;
  tlsKey?: string;
  maxUpload: number;
  maxSyntheses: number;
  ports: string;
  launcher: 'auto' | 'libvirt' | 'qemu';
  directory?: boolean;
  name?: string;
  advertise?: string;
  register?: string;
  registerTokenFile?: string;
  heartbeat: number;
  mdns?: string;
  mdnsPort?: number;
  timeout: number;
}

export function registerServe(program: Command): void {
  program
    .command('serve')
    .summary('run this machine as a cloudlet: the HTTP API over the library (docs/service.md)')
    .description(
      'Serve the API under /v1 until SIGINT/SIGTERM: synthesize uploaded or fetched overlays, list, stop and ' +
        'read the logs of instances, list and import bases. Every request but GET /v1/health needs a bearer ' +
        'token from --token-file (one per line; the file is re-read when it changes). With --directory, serve ' +
        'a directory of cloudlets instead. Instances outlive the server.',
    )
    .option('--listen <host:port>', 'address to listen on', '127.0.0.1:8470')
    .requiredOption('--token-file <file>', 'accepted bearer tokens, one per line')
    .option('--tls-cert <file>', 'serve HTTPS with this certificate (PEM)')
    .option('--tls-key <file>', 'and this key (PEM)')
    .addOption(
      new Option('--max-upload <bytes>', 'largest upload (e.g. 4G, 512M)')
        .argParser(bytesArg)
        .default(4 * 2 ** 30, '4G'),
    )
    .addOption(
      new Option('--max-syntheses <n>', 'concurrent syntheses; more get 429')
        .argParser(intArg)
        .default(cpus().length, 'cores'),
    )
    .option('--ports <first-last>', 'host ports for the forwards of synthesized VMs', '20000-20999')
    .addOption(new Option('--launcher <who>', 'who runs QEMU').choices(['auto', 'libvirt', 'qemu']).default('auto'))
    .option('--directory', 'be a directory of cloudlets (they heartbeat here; discover asks here)')
    .option('--name <name>', 'this cloudlet’s name (default: the host name)')
    .option('--advertise <url>', 'the URL clients use (default: from --listen)')
    .option('--register <url>', 'heartbeat to this directory')
    .option(
      '--register-token-file <file>',
      'token for the directory (default: $CLOUDLET_DIRECTORY_TOKEN, $CLOUDLET_TOKEN)',
    )
    .addOption(
      new Option('--heartbeat <duration>', 'heartbeat interval (TTL: 3×)')
        .argParser(durationArg)
        .default(10_000, '10s'),
    )
    .option('--mdns <address>', 'announce _cloudlet._tcp over mDNS on the interface with this IPv4 address')
    .addOption(new Option('--mdns-port <port>', 'mDNS port (tests)').argParser(intArg))
    .addOption(
      new Option('--timeout <duration>', "how long a synthesis waits for the guest's first answer")
        .argParser(durationArg)
        .default(60_000, '60s'),
    )
    .action(async (flags: ServeFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const s = await serveCloudlet({
        root: libraryRoot(g.library),
        listen: flags.listen,
        tokenFile: flags.tokenFile,
        tlsCert: flags.tlsCert,
        tlsKey: flags.tlsKey,
        maxUpload: flags.maxUpload,
        maxSyntheses: flags.maxSyntheses,
        ports: flags.ports,
        launcher: flags.launcher,
        directory: flags.directory ?? false,
        name: flags.name,
        advertise: flags.advertise,
        register: flags.register,
        registerTokenFile: flags.registerTokenFile,
        heartbeatS: Math.max(1, Math.round(flags.heartbeat / 1000)),
        mdns: flags.mdns,
        mdnsPort: flags.mdnsPort,
        readyTimeoutMs: flags.timeout,
        log: g.quiet ? undefined : (line) => process.stderr.write(`${line}\n`),
      });
      printResult(
        g,
        s.message,
        () => `${s.message.mode} ${s.message.name} serving on ${s.message.url} (launcher ${s.message.launcher})`,
      );
      await new Promise<void>((resolve) => onForegroundSignal(() => resolve()));
      await s.close();
    });
}
