/**
 * Error classes of cloudlet-overlay. Each has a stable `code` (equal to its class name) and
 * maps to one exit code; the CLI turns them into one line on stderr or a JSON object.
 */
import { ExitCode } from './exit-codes.js';

export interface ErrorDetails {
  [key: string]: string | number | boolean | null | undefined | string[];
}

export class CloudletError extends Error {
  readonly code: string = 'CloudletError';
  readonly exitCode: number = ExitCode.internal;
  readonly details: ErrorDetails;

  constructor(message: string, details: ErrorDetails = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.details = details;
    this.name = new.target.name;
  }

  /**
   * The error as one JSON object. Detail keys come out in snake_case (as every other key of the
   * JSON output) and can never replace the four fields every error has: a detail named
   * `exit_code` (a tool's own status) must not contradict the process status.
   */
  toJSON(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(this.details)) {
      if (v === undefined) continue;
      const key = snakeCase(k);
      out[RESERVED.has(key) ? `detail_${key}` : key] = v;
    }
    return { message_type: 'error', code: this.code, exit_code: this.exitCode, message: this.message, ...out };
  }
}

const RESERVED = new Set(['message_type', 'code', 'exit_code', 'message']);

/** `stderrTail` → `stderr_tail`; keys already in snake_case stay as they are. */
export function snakeCase(key: string): string {
  return key.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toLowerCase();
}

export class UsageError extends CloudletError {
  override readonly code = 'UsageError';
  override readonly exitCode = ExitCode.usage;
}

export class NotFoundError extends CloudletError {
  override readonly code = 'NotFoundError';
  override readonly exitCode = ExitCode.notFound;
}

/** A file is not what it claims: truncated, bit-flipped, inconsistent. */
export class CorruptInputError extends CloudletError {
  override readonly code = 'CorruptInputError';
  override readonly exitCode = ExitCode.corrupt;
}

export class BaseMismatchError extends CloudletError {
  override readonly code = 'BaseMismatchError';
  override readonly exitCode = ExitCode.baseMismatch;
}

/** A reconstructed target's checksum differs from the one the overlay recorded. */
export class HashMismatchError extends CloudletError {
  override readonly code = 'HashMismatchError';
  override readonly exitCode = ExitCode.verifyFailed;
}

export class UnsupportedError extends CloudletError {
  override readonly code = 'UnsupportedError';
  override readonly exitCode = ExitCode.unsupported;
}

/** QEMU (or qemu-img) failed; details carry its exit status and the end of its stderr. */
export class QemuError extends CloudletError {
  override readonly code = 'QemuError';
  override readonly exitCode = ExitCode.qemu;
}

export class TimeoutError extends CloudletError {
  override readonly code = 'TimeoutError';
  override readonly exitCode = ExitCode.timeout;
}

export class BusyError extends CloudletError {
  override readonly code = 'BusyError';
  override readonly exitCode = ExitCode.busy;
}

export class MissingToolError extends CloudletError {
  override readonly code = 'MissingToolError';
  override readonly exitCode = ExitCode.missingTool;
}

export class NetworkError extends CloudletError {
  override readonly code = 'NetworkError';
  override readonly exitCode = ExitCode.network;
}

/** A cloudlet refused the bearer token (HTTP 401). */
export class UnauthorizedError extends CloudletError {
  override readonly code = 'UnauthorizedError';
  override readonly exitCode = ExitCode.unauthorized;
}

export class InterruptedError extends CloudletError {
  override readonly code = 'InterruptedError';
  override readonly exitCode = ExitCode.interrupted;
}

/**
 * A trusted key is configured and the input is unsigned, signed by another key, or its
 * signature does not verify: refused before anything is written or launched.
 */
export class UntrustedError extends CloudletError {
  override readonly code = 'UntrustedError';
  override readonly exitCode = ExitCode.untrusted;
}

/** The file system holding an output is full; `path` names the output. */
export class NoSpaceError extends CloudletError {
  override readonly code = 'NoSpaceError';
  override readonly exitCode = ExitCode.noSpace;
}

/**
 * A Node.js file-system error as the class a user can act on, naming `path` (the output or
 * input the operation was working on when the error itself names none): no space → NoSpaceError,
 * a missing file or directory → NotFoundError, a directory where a file belongs → NotFoundError,
 * permission denied → NotFoundError ("cannot be read or written"), a file that exists → BusyError.
 * Anything else (and anything that is not an errno error) comes back unchanged.
 */
export function classifyFsError(err: unknown, path?: string): unknown {
  if (err instanceof CloudletError || !(err instanceof Error)) return err;
  const e = err as NodeJS.ErrnoException & { dest?: string };
  // A full disk is about where bytes were going (copyFile's dest), not where they came from.
  const nospace = e.code === 'ENOSPC' || e.code === 'EDQUOT' || e.code === 'EFBIG';
  // Only file-system calls: a socket's ENOENT (connect to a missing unix socket) is no missing file.
  if (!nospace && e.path === undefined && e.syscall !== undefined && !FS_SYSCALLS.has(e.syscall)) return err;
  const where = (nospace ? (e.dest ?? path ?? e.path) : (e.path ?? path)) ?? undefined;
  const at = where ? ` (${where})` : '';
  const details: ErrorDetails = where ? { path: where } : {};
  switch (e.code) {
    case 'ENOSPC':
    case 'EDQUOT':
      return new NoSpaceError(`no space left on the device${where ? ` holding ${where}` : ''}`, details, {
        cause: err,
      });
    case 'EFBIG':
      return new NoSpaceError(`file too large for its file system${at}`, details, { cause: err });
    case 'ENOENT':
      return new NotFoundError(`no such file or directory${at}`, details, { cause: err });
    case 'ENOTDIR':
      return new NotFoundError(`not a directory: a path component is a file${at}`, details, { cause: err });
    case 'EISDIR':
      return new NotFoundError(`is a directory, not a file${at}`, details, { cause: err });
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return new NotFoundError(`permission denied or read-only file system${at}`, details, { cause: err });
    case 'EEXIST':
      return new BusyError(`already exists${at}`, details, { cause: err });
    default:
      return err;
  }
}

const FS_SYSCALLS = new Set([
  'open',
  'read',
  'write',
  'close',
  'rename',
  'link',
  'unlink',
  'mkdir',
  'mkdtemp',
  'rmdir',
  'rm',
  'stat',
  'lstat',
  'fstat',
  'scandir',
  'copyfile',
  'ftruncate',
  'fsync',
  'fdatasync',
  'chmod',
  'fallocate',
]);

/** Runs `fn`; a file-system error it throws becomes its class (classifyFsError) naming `path`. */
export async function withPath<T>(path: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw classifyFsError(err, path);
  }
}

/** Throws CorruptInputError unless `cond` holds; used by parsers before trusting a field. */
export function check(cond: boolean, message: string, details: ErrorDetails = {}): asserts cond {
  if (!cond) throw new CorruptInputError(message, details);
}

const CLASSES: ReadonlyArray<new (message: string, details?: ErrorDetails) => CloudletError> = [
  UsageError,
  NotFoundError,
  CorruptInputError,
  BaseMismatchError,
  HashMismatchError,
  UnsupportedError,
  QemuError,
  TimeoutError,
  BusyError,
  MissingToolError,
  NetworkError,
  UnauthorizedError,
  InterruptedError,
];

/** What crosses a thread boundary for an error (structured clone keeps no class). */
export interface SerializedError {
  code: string;
  message: string;
  details: ErrorDetails;
}

export function serializeError(err: unknown): SerializedError {
  if (err instanceof CloudletError) return { code: err.code, message: err.message, details: err.details };
  const e = err instanceof Error ? err : new Error(String(err));
  return { code: 'Error', message: e.message, details: {} };
}

/** The error of its class again (a plain Error for anything not ours). */
export function deserializeError(s: SerializedError): Error {
  const C = CLASSES.find((c) => c.name === s.code);
  return C ? new C(s.message, s.details) : new Error(s.message);
}
