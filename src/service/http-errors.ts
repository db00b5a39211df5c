/**
 * Errors as HTTP answers: the status follows the error class (docs/service.md has the table),
 * the body is the CLI's own JSON error object (`message_type: 'error'`, `code`, `exit_code`,
 * `message`, details), so a client turns it back into the same error and exit code.
 */
import { CloudletError } from '../util/errors.js';
import { ExitCode } from '../util/exit-codes.js';

export const STATUS_OF_CODE: Readonly<Record<string, number>> = {
  UsageError: 400,
  UnauthorizedError: 401,
  NotFoundError: 404,
  BusyError: 409,
  BaseMismatchError: 409,
  CorruptInputError: 422,
  HashMismatchError: 422,
  UnsupportedError: 422,
  InternalError: 500,
  QemuError: 502,
  NetworkError: 502,
  MissingToolError: 503,
  InterruptedError: 503,
  TimeoutError: 504,
};

export interface ErrorAnswer {
  status: number;
  body: Record<string, unknown>;
  headers: Record<string, string>;
}

/** The status, body and headers for any thrown value. */
export function errorAnswer(err: unknown): ErrorAnswer {
  if (err instanceof CloudletError) {
    const body = err.toJSON();
    const override = body['http_status'];
    delete body['http_status'];
    const status = typeof override === 'number' ? override : (STATUS_OF_CODE[err.code] ?? 500);
    const headers: Record<string, string> = {};
    if (status === 401) headers['www-authenticate'] = 'Bearer realm="cloudlet"';
    if (typeof body['retry_after_s'] === 'number') headers['retry-after'] = String(body['retry_after_s']);
    return { status, body, headers };
  }
  const message = err instanceof Error ? err.message : String(err);
  return {
    status: 500,
    body: { message_type: 'error', code: 'InternalError', exit_code: ExitCode.internal, message },
    headers: {},
  };
}
