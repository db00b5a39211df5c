/**
 * The guest's serial console (QEMU chardev socket) as a command channel: type one shell command
 * line, wait for a marker that proves it finished, and get its exit status and output. Lets a
 * test or demo "install an application" in a guest that has no agent and no ssh.
 *
 * The guest echoes what we type (tty echo, busybox line editing), so the marker is written in a
 * form whose echo cannot match: we type `echo "__CLD_<id>:$?:END"` and wait for
 * `__CLD_<id>:<digits>:END`, which only the shell's expansion produces.
 */
import { constants, openSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { ReadStream, WriteStream } from 'node:tty';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { QemuError, TimeoutError, UsageError } from '../util/errors.js';

export interface RunResult {
  /** Exit status of the command line as the guest shell saw it ($?). */
  status: number;
  /** What the command printed (echo of the typed line, prompts and escapes removed). */
  output: string;
  elapsedMs: number;
}

/** busybox line editing keeps at most ~1 KiB per line. */
const MAX_LINE = 900;

export class SerialConsole {
  private text = '';
  private closed = false;
  private waiters = new Set<() => void>();

  private constructor(private readonly socket: Socket | Duplex) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.text += chunk;
      // A console is a debugging aid, not a log: bound what we keep.
      if (this.text.length > 8 << 20) this.text = this.text.slice(-(1 << 20));
      for (const w of this.waiters) w();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters) w();
    });
  }

  /**
   * Connects to the serial socket, retrying until it appears (QEMU may still be starting); a
   * /dev/pts path (libvirt's pty console) is opened as a terminal instead.
   */
  static async connect(path: string, options: { timeoutMs?: number } = {}): Promise<SerialConsole> {
    if (path.startsWith('/dev/')) return new SerialConsole(openPty(path));
    const deadline = Date.now() + (options.timeoutMs ?? 10_000);
    for (;;) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once('error', reject);
          s.once('connect', () => {
            s.off('error', reject);
            resolve(s);
          });
        });
        return new SerialConsole(socket);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() > deadline) {
          throw new QemuError(`cannot connect to the serial console ${path}: ${(err as Error).message}`, { path });
        }
        await sleep(25);
      }
    }
  }

  /** Everything received since connecting. */
  get transcript(): string {
    return this.text;
  }

  write(data: string): void {
    if (this.closed) throw new QemuError('serial console is closed');
    this.socket.write(data);
  }

  /**
   * Waits until a shell answers on the console: types a probe line every second until its
   * expanded answer comes back.
   */
  async ready(options: { timeoutMs?: number } = {}): Promise<void> {
    const timeoutMs = options.timeoutMs ?? 30_000;
    const id = randomBytes(4).toString('hex');
    const answer = new RegExp(`__CLD_${id}:42:RDY`);
    const deadline = Date.now() + timeoutMs;
    const from = this.text.length;
    while (Date.now() < deadline) {
      this.write(`\necho "__CLD_${id}:$((6*7)):RDY"\n`);
      const found = await this.waitFor(answer, { timeoutMs: Math.min(1000, deadline - Date.now()), from }).catch(
        (err: unknown) => {
          if (err instanceof TimeoutError) return null;
          throw err;
        },
      );
      if (found) return;
    }
    throw new TimeoutError(`no shell answered on the serial console within ${timeoutMs} ms`);
  }

  /**
   * Types one command line and waits for it to finish. The line must not contain a newline or
   * end in a comment; a trailing `&` is fine (the command then runs in the background).
   */
  async run(command: string, options: { timeoutMs?: number } = {}): Promise<RunResult> {
    const cmd = command.trim();
    if (cmd.includes('\n')) throw new UsageError('a console command must be one line');
    if (cmd.length > MAX_LINE) throw new UsageError(`a console command must be under ${MAX_LINE} characters`);
    const id = randomBytes(4).toString('hex');
    const marker = `__CLD_${id}`;
    const sep = /(^|[^&])&$/.test(cmd) ? ' ' : '; ';
    // Output markers that the echoed (and line-wrapped) command itself cannot produce: the start
    // marker alone on its line, the end marker with the status's digits where the echo has "$?".
    const line = `echo ${marker}_S; ${cmd}${sep}echo "${marker}:$?:END"`;
    const started = performance.now();
    const from = this.text.length;
    this.write(line + '\n');
    const m = await this.waitFor(new RegExp(`${marker}:(\\d+):END`), {
      timeoutMs: options.timeoutMs ?? 60_000,
      from,
    });
    const raw = this.text.slice(from, m.index);
    return {
      status: Number(m[1]),
      output: cleanOutput(raw, marker),
      elapsedMs: performance.now() - started,
    };
  }

  /** Resolves with the first match of `pattern` in text received at or after offset `from`. */
  waitFor(pattern: RegExp, options: { timeoutMs?: number; from?: number } = {}): Promise<RegExpExecArray> {
    const timeoutMs = options.timeoutMs ?? 30_000;
    const from = Math.min(options.from ?? 0, this.text.length);
    return new Promise<RegExpExecArray>((resolve, reject) => {
      const check = (): void => {
        const slice = this.text.slice(Math.min(from, this.text.length));
        const m = new RegExp(pattern.source, pattern.flags.replace('g', '')).exec(slice);
        if (m) {
          done();
          m.index += Math.min(from, this.text.length);
          resolve(m);
        } else if (this.closed) {
          done();
          reject(new QemuError('serial console closed while waiting for output'));
        }
      };
      const done = (): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      const timer = setTimeout(() => {
        done();
        reject(
          new TimeoutError(`no ${pattern.source} on the serial console within ${timeoutMs} ms`, {
            tail: this.text.slice(-300),
          }),
        );
      }, timeoutMs);
      this.waiters.add(check);
      check();
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await new Promise<void>((resolve) => {
      this.socket.once('close', () => resolve());
      this.socket.end();
      setTimeout(() => this.socket.destroy(), 500).unref();
    });
  }
}

/** Strips terminal escapes, CRs, the echo of the typed line and the prompt. */
function cleanOutput(raw: string, marker: string): string {
  // eslint-disable-next-line no-control-regex
  const text = raw.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').replace(/\r/g, '');
  const start = text.match(new RegExp(`(^|\\n)${marker}_S\\n`));
  const body = start ? text.slice(start.index! + start[0].length) : text;
  return body.replace(/\n$/, '');
}

/** A pty's slave side as one duplex stream (QEMU keeps it raw). */
export function openPty(path: string): Duplex {
  const fd = openSync(path, constants.O_RDWR | constants.O_NOCTTY);
  const input = new ReadStream(fd);
  const output = new WriteStream(fd);
  const d = new Duplex({
    read() {
      input.resume();
    },
    write(chunk: Buffer | string, _enc, cb) {
      output.write(chunk, cb);
    },
    final(cb) {
      input.destroy();
      output.destroy();
      cb();
    },
    destroy(err, cb) {
      input.destroy();
      output.destroy();
      cb(err);
    },
  });
  input.on('data', (b: Buffer) => {
    if (!d.push(b)) input.pause();
  });
  input.on('error', () => d.destroy());
  input.on('close', () => d.push(null));
  return d;
}
