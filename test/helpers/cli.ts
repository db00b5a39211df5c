/** Runs the built CLI as a user would, with --json, and parses its answer. */
import assert from 'node:assert/strict';
import { execFile, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const BIN = fileURLToPath(new URL('../../../bin/cloudlet-overlay.js', import.meta.url));

export interface CliResult {
  code: number;
  json: Record<string, unknown>;
  stdout: string;
  stderr: string;
}

export function cli(args: string[], env: NodeJS.ProcessEnv = process.env, timeoutMs = 180_000): Promise<CliResult> {
  return cliChild(args, env, timeoutMs).result;
}

/** The JSON answer of a run that must succeed; else an AssertionError with the end of its stderr. */
export function ok(r: CliResult, what: string): Record<string, unknown> {
  assert.equal(r.code, 0, `${what} failed (${r.code}): ${r.stderr.slice(-4000)}`);
  return r.json;
}

/** Stops every instance of the library `env` names (a test's clean-up). */
export async function stopAllInstances(env: NodeJS.ProcessEnv): Promise<void> {
  const ps = await cli(['ps'], env);
  for (const i of (ps.json.instances as Array<{ id: string }> | undefined) ?? []) await cli(['stop', i.id], env);
}

/** The same, with the process (to signal it while it runs). */
export function cliChild(
  args: string[],
  env: NodeJS.ProcessEnv = process.env,
  timeoutMs = 180_000,
): { child: ChildProcess; result: Promise<CliResult> } {
  let child!: ChildProcess;
  const result = new Promise<CliResult>((resolve) => {
    child = execFile(
      process.execPath,
      [BIN, '--json', ...args],
      { env, maxBuffer: 64 << 20, timeout: timeoutMs },
      (err, stdout, stderr) => {
        let json: Record<string, unknown> = {};
        try {
          json = JSON.parse(stdout) as Record<string, unknown>;
        } catch {
          // not JSON (usage errors from commander)
        }
        const code = err
          ? typeof (err as { code?: unknown }).code === 'number'
            ? (err as { code: number }).code
            : 1
          : 0;
        resolve({ code, json, stdout, stderr });
      },
    );
  });
  return { child, result };
}
