/**
 * An instance's serial console: run one shell command in the guest (its output and exit
 * status), or connect a terminal to it. The caller owns the terminal (raw mode, what to print);
 * this owns finding the instance and talking to its console socket.
 */
import { connect } from 'node:net';
import type { Readable, Writable } from 'node:stream';
import { openPty, SerialConsole } from '../vm/console.js';
import { NotFoundError } from '../util/errors.js';
import { findInstance } from './instance.js';

export interface ConsoleRunResult {
  message_type: 'console_run';
  instance: string;
  status: number;
  output: string;
}

/** Types `command` into the guest shell and waits for it to finish (see vm/console.ts). */
export async function runInConsole(
  root: string,
  ref: string,
  command: string,
  timeoutMs: number,
): Promise<ConsoleRunResult> {
  const s = await findInstance(root, ref);
  const con = await SerialConsole.connect(s.serial_socket).catch((err: unknown) => {
    throw new NotFoundError(`cannot reach the console of ${s.id}: ${(err as Error).message}`, { instance: s.id });
  });
  try {
    await con.ready({ timeoutMs: 20_000 });
    const r = await con.run(command, { timeoutMs });
    return { message_type: 'console_run', instance: s.id, status: r.status, output: r.output };
  } finally {
    await con.close();
  }
}

export interface ConsoleTerminal {
  input: Readable;
  output: Writable;
  /** Called once connected (e.g. to switch the terminal to raw mode). */
  onConnect(instance: string): void;
  /** Called once the console closed. */
  onClose(): void;
}

/** Byte that ends an interactive session: Ctrl-]. */
const QUIT = 0x1d;

/** Connects `term` to the console until Ctrl-] or until the VM closes it. */
export async function attachConsole(root: string, ref: string, term: ConsoleTerminal): Promise<void> {
  const s = await findInstance(root, ref);
  await new Promise<void>((resolve, reject) => {
    const pty = s.serial_socket.startsWith('/dev/');
    const sock = pty ? openPty(s.serial_socket) : connect(s.serial_socket);
    sock.once('error', (err) =>
      reject(
        new NotFoundError(`the console of ${s.id} is gone (is its VM running?): ${err.message}`, { instance: s.id }),
      ),
    );
    const connected = (): void => {
      term.onConnect(s.id);
      term.input.on('data', (d: Buffer) => {
        if (d.includes(QUIT)) {
          sock.end();
          return;
        }
        sock.write(d);
      });
      sock.pipe(term.output);
    };
    if (pty) connected();
    else sock.once('connect', connected);
    sock.once('close', () => {
      term.onClose();
      resolve();
    });
  });
}
