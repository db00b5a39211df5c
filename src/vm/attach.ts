/**
 * A running QEMU we did not start (or started in an earlier run), reached through its QMP
 * socket: enough to snapshot it. The process is found by the socket path on its command line.
 */
import { readdir, readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from './qmp.js';
import { specFromArgv } from './argv-spec.js';
import type { VmSpec } from '../spec/vm-spec.js';
import { NotFoundError } from '../util/errors.js';

export class AttachedVm {
  private readonly abort = new AbortController();
  readonly exitSignal: AbortSignal = this.abort.signal;

  private constructor(
    readonly qmp: QmpClient,
    readonly pid: number,
    readonly argv: string[],
    readonly spec: VmSpec,
  ) {
    qmp.once('close', () => this.abort.abort(new NotFoundError(`QEMU (pid ${pid}) went away`)));
  }

  /** Connects; `spec` when known (our own instances), else read from the command line. */
  static async attach(qmpSocket: string, spec?: VmSpec): Promise<AttachedVm> {
    const path = resolve(qmpSocket);
    const qmp = await QmpClient.connect(path, { timeoutMs: 5000 }).catch((err: unknown) => {
      throw new NotFoundError(
        `no QEMU answers on ${path} (QEMU serves one QMP client per socket: is another one connected?): ` +
          (err as Error).message,
        { path },
      );
    });
    const found = await findByArg(path);
    const argv = found?.argv ?? [];
    return new AttachedVm(qmp, found?.pid ?? -1, argv, spec ?? specFromArgv(argv));
  }

  get running(): boolean {
    return !this.qmp.closed;
  }

  /** QMP quit and wait until the process is gone. */
  async stop(): Promise<void> {
    await this.qmp.execute('quit').catch(() => undefined);
    for (let i = 0; i < 100 && this.pid > 0; i++) {
      try {
        process.kill(this.pid, 0);
      } catch {
        return;
      }
      await sleep(50);
    }
  }

  async detach(): Promise<void> {
    await this.qmp.close();
  }
}

async function findByArg(socket: string): Promise<{ pid: number; argv: string[] } | undefined> {
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const raw = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (!raw.includes(socket) || !raw.includes('qemu')) continue;
    const argv = raw.split('\0');
    if (argv[argv.length - 1] === '') argv.pop();
    return { pid: Number(name), argv };
  }
  return undefined;
}
