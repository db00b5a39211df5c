/**
 * The external programs cloudlet-overlay runs, found one way for all of them: a name with a
 * slash is taken as a path, a bare name is looked up on PATH; a tool may be redirected by an
 * environment variable (QEMU_IMG for custom builds and tests). A missing program is a
 * MissingToolError that names the Debian package to install.
 */
import { constants } from 'node:fs';
import { access } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { MissingToolError } from './errors.js';

interface Tool {
  /** Debian package that ships it. */
  package: string;
  /** Environment variable that overrides the program, when the tool has one. */
  env?: string;
}

const TOOLS: { [name: string]: Tool } = {
  'qemu-img': { package: 'qemu-utils', env: 'QEMU_IMG' },
  'qemu-system-x86_64': { package: 'qemu-system-x86' },
  tar: { package: 'tar' },
  virsh: { package: 'libvirt-clients' },
};

/** The program to run for a tool: its environment override, else the tool's own name. */
export function programFor(tool: string): string {
  const env = TOOLS[tool]?.env;
  return (env && process.env[env]) || tool;
}

/** The runnable file `program` names (a path, or a name on PATH), or undefined. */
export async function locateProgram(program: string): Promise<string | undefined> {
  const candidates = program.includes('/')
    ? [program]
    : (process.env['PATH'] ?? '/usr/bin:/bin').split(delimiter).map((d) => join(d, program));
  for (const c of candidates) {
    try {
      await access(c, constants.X_OK);
      return c;
    } catch {
      // next candidate
    }
  }
  return undefined;
}

/**
 * The runnable file for `program` (a tool name, or a path given by the caller); throws
 * MissingToolError naming the Debian package when it is not there.
 */
export async function findProgram(program: string): Promise<string> {
  const found = await locateProgram(program);
  if (found) return found;
  throw missingTool(program.split('/').pop() ?? program, program);
}

/** Like findProgram for one of the known tools, honouring its environment override. */
export async function findTool(tool: string): Promise<string> {
  const program = programFor(tool);
  const found = await locateProgram(program);
  if (found) return found;
  throw missingTool(tool, program);
}

/** The error for a program that is not installed, with the package that provides it. */
export function missingTool(tool: string, program: string = tool): MissingToolError {
  const pkg = TOOLS[tool]?.package ?? (tool.startsWith('qemu-') ? 'qemu-system-x86 qemu-utils' : undefined);
  const hint = pkg ? `install it (Debian: apt-get install ${pkg})` : 'install it';
  return new MissingToolError(`${program} not found on PATH; ${hint}`, { tool, ...(pkg ? { package: pkg } : {}) });
}
