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

  toJSON(): Record<string, unknown> {
    return {
      message_type: 'error',
      code: this.code,
      exit_code: this.exitCode,
      message: this.message,
      ...this.details,
    };
  }
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
