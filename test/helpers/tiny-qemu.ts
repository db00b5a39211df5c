/**
 * A kernel-less QEMU guest for tests: qemu-system-x86_64 running SeaBIOS under TCG, with a
 * minimal QMP client (one command at a time, events ignored). Enough to take migration streams
 * and load them back; the real QMP client lives in src/vm/qmp.ts.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { createConnection, type Socket } from 'node:net';
import { delimiter, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TestContext } from 'node:test';

export const QEMU_BINARY = 'qemu-system-x86_64';

export function findQemu(): string | null {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    const candidate = join(dir, QEMU_BINARY);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // keep looking
    }
  }
  return null;
}

/**
 * True when QEMU can run. Without it: fail under CI (the e2e tests are the proof), otherwise
 * skip loudly.
 */
export function requireQemu(t: TestContext): boolean {
  if (findQemu() !== null) return true;
  if (process.env.CI) throw new Error(`${QEMU_BINARY} not found on PATH, and CI is set: these tests must run in CI`);
  process.stderr.write(`\n!!! ${QEMU_BINARY} not found: QEMU end-to-end tests SKIPPED (they fail under CI) !!!\n\n`);
  t.skip(`${QEMU_BINARY} not installed`);
  return false;
}

export interface TinyQemuOptions {
  /** Directory for the QMP socket. */
  dir: string;
  name: string;
  memMiB?: number;
  /** -incoming URI; implies -S so the loaded guest stays paused. */
  incoming?: string;
  /** Extra arguments (e.g. a memory backend). */
  args?: string[];
  /** Replaces the default "-machine pc-q35-7.2". */
  machine?: string;
}

export interface MigrationRamStats {
  total: number;
  normal: number;
  duplicate: number;
  transferred: number;
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

export class TinyQemu {
  private stderr = '';
  private buffered = '';
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private exited: Promise<number | null>;
  private exitCode: number | null | undefined;
  private socket: Socket | null = null;

  private constructor(
    readonly name: string,
    private readonly child: ChildProcess,
  ) {
    child.stderr!.on('data', (d: Buffer) => {
      this.stderr += d.toString();
    });
    this.exited = new Promise((resolve) => {
      child.on('exit', (code) => {
        this.exitCode = code;
        for (const p of this.pending.values()) p.reject(new Error(`QEMU ${name} exited (${code}): ${this.stderr}`));
        this.pending.clear();
        resolve(code);
      });
    });
  }

  static async start(opts: TinyQemuOptions): Promise<TinyQemu> {
    const sock = join(opts.dir, `${opts.name}.qmp`);
    const args = [
      '-accel',
      'tcg',
      '-machine',
      opts.machine ?? 'pc-q35-7.2',
      '-m',
      String(opts.memMiB ?? 64),
      '-nodefaults',
      '-display',
      'none',
      '-qmp',
      `unix:${sock},server=on,wait=off`,
      ...(opts.incoming !== undefined ? ['-S', '-incoming', opts.incoming] : []),
      ...(opts.args ?? []),
    ];
    const child = spawn(findQemu() ?? QEMU_BINARY, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    const vm = new TinyQemu(opts.name, child);
    await vm.connect(sock);
    return vm;
  }

  /** Runs one QMP command; rejects with QEMU's error description. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.socket === null) return Promise.reject(new Error('QMP not connected'));
    const id = this.nextId++;
    const msg = JSON.stringify(
      args === undefined ? { execute: command, id } : { execute: command, arguments: args, id },
    );
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket!.write(`${msg}\n`);
    });
  }

  async status(): Promise<string> {
    return (await this.execute<{ status: string }>('query-status')).status;
  }

  /** Waits until an -incoming load finished; fails if QEMU died (a rejected stream). */
  async waitIncoming(timeoutMs = 60_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const s = await this.status();
      if (s !== 'inmigrate') return s;
      if (Date.now() > deadline) throw new Error(`QEMU ${this.name}: still inmigrate after ${timeoutMs} ms`);
      await sleep(20);
    }
  }

  /**
   * Migrates to a file with `exec:cat > FILE` at full speed, with the given migration
   * capabilities turned on; returns QEMU's RAM counters.
   */
  async migrateToFile(path: string, capabilities: string[] = [], timeoutMs = 120_000): Promise<MigrationRamStats> {
    await this.execute('migrate-set-parameters', { 'max-bandwidth': 1024 * 1024 * 1024 * 1024 });
    if (capabilities.length > 0) {
      await this.execute('migrate-set-capabilities', {
        capabilities: capabilities.map((capability) => ({ capability, state: true })),
      });
    }
    await this.execute('migrate', { uri: `exec:cat > ${path}` });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.execute<{ status?: string; ram?: MigrationRamStats; 'error-desc'?: string }>(
        'query-migrate',
      );
      if (info.status === 'completed') return info.ram!;
      if (info.status === 'failed' || info.status === 'cancelled') {
        throw new Error(`QEMU ${this.name}: migration ${info.status}: ${info['error-desc'] ?? ''}`);
      }
      if (Date.now() > deadline) throw new Error(`QEMU ${this.name}: migration not done after ${timeoutMs} ms`);
      await sleep(20);
    }
  }

  /** Asks QEMU to quit; kills this process (by its pid) if it does not exit in time. */
  async quit(): Promise<void> {
    if (this.exitCode !== undefined) return;
    this.execute('quit').catch(() => undefined);
    const timer = sleep(5000).then(() => 'timeout' as const);
    if ((await Promise.race([this.exited, timer])) === 'timeout') {
      this.child.kill('SIGKILL');
      await this.exited;
    }
    this.socket?.destroy();
  }

  get log(): string {
    return this.stderr;
  }

  private async connect(path: string): Promise<void> {
    const deadline = Date.now() + 15_000;
    for (;;) {
      if (this.exitCode !== undefined) throw new Error(`QEMU ${this.name} exited (${this.exitCode}): ${this.stderr}`);
      try {
        this.socket = await new Promise<Socket>((resolve, reject) => {
          const s = createConnection(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        break;
      } catch {
        if (Date.now() > deadline) {
          await this.quit();
          throw new Error(`QEMU ${this.name}: no QMP socket after 15 s: ${this.stderr}`);
        }
        await sleep(25);
      }
    }
    const greeting = new Promise<void>((resolve) => {
      this.socket!.on('data', (d: Buffer) => {
        this.buffered += d.toString();
        for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
          const line = this.buffered.slice(0, nl).trim();
          this.buffered = this.buffered.slice(nl + 1);
          if (line === '') continue;
          const msg = JSON.parse(line) as { QMP?: unknown; id?: number; return?: unknown; error?: { desc: string } };
          if (msg.QMP !== undefined) resolve();
          if (msg.id === undefined) continue; // greeting or event
          const p = this.pending.get(msg.id);
          this.pending.delete(msg.id);
          if (msg.error !== undefined) p?.reject(new Error(`QMP ${this.name}: ${msg.error.desc}`));
          else p?.resolve(msg.return);
        }
      });
    });
    this.socket.on('error', () => undefined);
    const died = this.exited.then((code) => {
      throw new Error(`QEMU ${this.name} exited (${code}) before QMP was ready: ${this.stderr}`);
    });
    await Promise.race([greeting, died]);
    await this.execute('qmp_capabilities');
  }
}
