/** The tool's name and version, as recorded in overlays and printed by --version. */
import { readFileSync } from 'node:fs';

const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };

export const VERSION: string = pkg.version;
export const TOOL = `cloudlet-overlay ${VERSION}`;
